"""End-to-end: the Hydra runner as a user runs it (subprocesses), resume after a kill, multirun, README."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runners.store import RunMismatchError, RunStore

ROOT = Path(__file__).resolve().parents[1]
TIMING_FIELDS = {"vision_s", "compress_s", "prefill_s", "decode_s"}


def run_evaluate(*overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    flags = [a for a in overrides if a.startswith("-")]  # Hydra wants -m before the overrides
    command = [sys.executable, "-m", "runners.evaluate", *flags, "progress=false",
               *(a for a in overrides if not a.startswith("-"))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def summary_without_timings(path: Path) -> dict:
    summary = json.loads(path.read_text())
    summary.pop("timings_mean_s")
    summary.pop("run_dir")
    summary["config"].pop("paths")
    return summary


@pytest.mark.slow
def test_single_run_writes_records_and_summary(tmp_path):
    proc = run_evaluate("compressor=random", "benchmark.limit=3", "save_provenance=true",
                        f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs/tiny/synthetic/benchmark.limit=3,compressor=random"
    records = read_records(run_dir / "samples.jsonl")
    assert [r["id"] for r in records] == [f"synthetic-s0-{i:04d}" for i in range(3)]
    for record in records:
        for key in ("prompt", "prediction", "reference", "score", "visual_tokens_before", "visual_tokens_after",
                    *TIMING_FIELDS):
            assert key in record
        assert record["visual_tokens_after"] < record["visual_tokens_before"]
        assert len(record["provenance"]["token"]) == len(record["provenance"]["source"]) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_samples"] == 3 and summary["compressor"] == {"name": "random", "ratio": 0.25, "seed": 0}
    assert 0.25 < summary["retention_actual"] < 0.35  # floors + kept row newlines
    assert "accuracy" in summary["metrics"]
    assert "vtclab" in proc.stdout and "random" in proc.stdout  # the results table


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_files(tmp_path):
    args = ("compressor=random", "benchmark.limit=8")  # random draws per sample: a resume must draw the same
    reference_dir = tmp_path / "reference"
    assert run_evaluate(*args, f"hydra.run.dir={reference_dir}", cwd=tmp_path).returncode == 0

    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "runners.evaluate", "progress=false", *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = run_dir / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if samples.exists() and samples.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = samples.read_text().count("\n")
    assert 3 <= done_before < 8, "the run should have been killed part-way"
    with open(samples, "a") as handle:  # a torn line, as a kill in the middle of a write leaves
        handle.write('{"id": "synthetic-s0-00')

    proc = run_evaluate(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_records(samples)
    assert without_timings(resumed) == without_timings(read_records(reference_dir / "samples.jsonl"))
    assert summary_without_timings(run_dir / "summary.json") == summary_without_timings(
        reference_dir / "summary.json")
    assert f"{done_before} already done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_multirun_runs_each_combination_in_its_own_directory(tmp_path):
    proc = run_evaluate("-m", "compressor=random,pooling", "compressor.ratio=0.5,0.25", "benchmark.limit=2",
                        f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "runs/tiny/synthetic"
    expected = {f"benchmark.limit=2,compressor.ratio={r},compressor={c}" for c in ("random", "pooling")
                for r in ("0.5", "0.25")}
    assert {p.name for p in runs.iterdir()} == expected
    for name in expected:
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["num_samples"] == 2
        assert name.endswith(summary["compressor"]["name"])
    table = (tmp_path / "runs" / "multirun_results.csv").read_text().splitlines()
    assert len(table) == 1 + 4 and table[0].startswith("model,benchmark,compressor,ratio")
    assert "multirun: 4 runs" in proc.stdout


def test_resume_with_other_settings_is_refused(tmp_path):
    with RunStore(tmp_path, identity={"compressor": {"name": "random", "ratio": 0.5}}) as store:
        store.append({"id": "a", "score": 1.0})
    with pytest.raises(RunMismatchError, match=r"compressor.ratio: 0.5 -> 0.25.*resume=false"):
        RunStore(tmp_path, identity={"compressor": {"name": "random", "ratio": 0.25}})
    with RunStore(tmp_path, identity={"compressor": {"name": "random", "ratio": 0.25}}, resume=False) as store:
        assert store.completed_ids() == set()


def test_torn_last_line_is_dropped(tmp_path):
    identity = {"x": 1}
    with RunStore(tmp_path, identity=identity) as store:
        store.append({"id": "a"})
        store.append({"id": "b"})
    path = tmp_path / "samples.jsonl"
    path.write_text(path.read_text() + '{"id": "c", "sco')
    store = RunStore(tmp_path, identity=identity)
    assert store.completed_ids() == {"a", "b"}
    assert path.read_text().endswith('"b"}\n')


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash)?\n(.*?)```", text, re.S)
    assert match, f"README has no block marked {marker}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_block("test-command")
    ci = (ROOT / ".ci/run").read_text()
    assert command in ci


@pytest.mark.slow
def test_readme_main_command_runs(tmp_path):
    """The README's main job, minus the install steps, on a short benchmark."""
    command = _readme_block("main-command")
    job = command.split("&&")[-1].strip()
    assert job.startswith("python -m runners.evaluate")
    args = shlex.split(job)[3:]
    proc = run_evaluate(*args, "benchmark.limit=2", f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout
    rows = (tmp_path / "runs" / "multirun_results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(args[1].split("=")[1].split(","))  # one row per compressor of the sweep
