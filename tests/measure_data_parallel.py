"""Measure one run in one process against the same run under ``accelerate launch`` with N processes.

    python tests/measure_data_parallel.py --processes 2 --limit 16 [--threads 1] [overrides...]

Runs ``python -m runners.evaluate`` and ``accelerate launch --multi_gpu --num_processes N -m
runners.evaluate`` (torch.distributed.run's processes; on a machine without a GPU they run on the
CPU) on the same settings into two fresh run directories, prints each command's wall time, and
checks that the two runs' ``samples.jsonl`` and ``summary.json`` are equal apart from timings.
Not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"vision_s", "compress_s", "prefill_s", "decode_s"}


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def comparable(run: Path) -> tuple[list[dict], dict]:
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
               for line in (run / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("timings_mean_s", "timings_s", "environment", "run_dir"):
        summary.pop(key, None)
    summary["config"].pop("run_dir", None)
    return records, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (num_threads)")
    parser.add_argument("overrides", nargs="*", default=["compressor=random", "benchmark.max_new_tokens=8"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = ["progress=false", f"num_threads={args.threads}", f"benchmark.limit={args.limit}",
                  f"paths.output_dir={work}", *args.overrides]
        single = timed([sys.executable, "-m", "runners.evaluate", *common, f"run_dir={work / 'single'}"], work)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "-m", "runners.evaluate", *common, f"run_dir={work / 'parallel'}"]
        parallel = timed(launch, work)
        same = comparable(work / "single") == comparable(work / "parallel")
    print(f"{args.limit} samples, {args.threads} thread(s) per process, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}: 1 process {single:.1f} s, {args.processes} processes {parallel:.1f} s "
          f"(x{single / parallel:.2f}); files equal apart from timings: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
