"""Recompute finished runs' metrics from their ``samples.jsonl`` alone: no model, no data.

    python -m runners.rescore outputs/runs/llava_next_7b/pope/compressor=fastv
    python -m runners.rescore RUN_DIR [RUN_DIR ...] benchmark.scorer_variant=lmms_eval

Every per-sample score field is recomputed from the stored prediction, references and meta, then
the summary is rebuilt exactly as ``runners.evaluate`` builds it. With the run's own scorer
variant the result replaces ``summary.json`` (identical unless the scorer changed); with another
variant it goes to ``summary.<variant>.json`` next to it. ``samples.jsonl`` is never modified.
Prompts are not rescored: a variant that also changes prompts (none does today) needs a new run.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchmarks  # noqa: F401  (registers every benchmark)
from benchmarks.registry import get_benchmark_class
from runners.report import console, render_table
from runners.scoring import is_failed, summarise_run
from runners.store import SAMPLES_FILE, SUMMARY_FILE, write_json_atomic

OVERRIDABLE = ("benchmark.scorer_variant",)
RUN_KEYS = ("model", "benchmark", "compressor", "run_dir", "environment")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``samples.jsonl``, read-only (a torn last line is ignored)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            if line.strip():
                records.append(json.loads(line))
    return records


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in OVERRIDABLE:
            raise ValueError(f"cannot rescore with {item!r}: only {', '.join(k + '=...' for k in OVERRIDABLE)} "
                             "changes scoring (anything else needs a new run)")
        parsed[key] = value
    return parsed


def rescore(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Path]:
    """Rescore one run directory; returns the new summary and the file it was written to."""
    run_dir = Path(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.exists() or not (run_dir / SAMPLES_FILE).exists():
        raise FileNotFoundError(f"{run_dir} has no {SUMMARY_FILE} and {SAMPLES_FILE}: rescore needs a finished run "
                                "(rerun its command to resume it)")
    old = json.loads(summary_path.read_text(encoding="utf-8"))
    config = copy.deepcopy(old["config"])
    benchmark_cfg = config["benchmark"]
    own_variant = benchmark_cfg.get("scorer_variant", "llava")
    variant = parse_overrides(overrides).get("benchmark.scorer_variant", own_variant)
    scorer = get_benchmark_class(benchmark_cfg["name"]).build_scorer(variant)
    if variant != own_variant:
        benchmark_cfg["scorer_variant"] = variant

    records = read_records(run_dir / SAMPLES_FILE)
    if benchmark_cfg.get("limit"):
        records = records[: benchmark_cfg["limit"]]
    rescored = [record if is_failed(record) else
                {**record, **scorer.score(record["prediction"], record["reference"], record["meta"])}
                for record in records]
    run = {key: old[key] for key in RUN_KEYS if key in old}
    summary = summarise_run(scorer, rescored, run={**run, "config": config})
    target = summary_path if variant == own_variant else run_dir / f"summary.{variant}.json"
    write_json_atomic(target, summary)
    return summary, target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Recompute finished runs' metrics from samples.jsonl.")
    parser.add_argument("args", nargs="+", metavar="RUN_DIR | benchmark.scorer_variant=...")
    args = parser.parse_args(argv)
    overrides = [a for a in args.args if "=" in a]
    run_dirs = [a for a in args.args if "=" not in a]
    summaries = []
    for run_dir in run_dirs:
        summary, target = rescore(run_dir, overrides)
        summaries.append(summary)
        headline = summary.get("headline")
        shown = f"{headline['label']} {headline['value']:.2f} {headline['unit']}" if headline else "no local score"
        print(f"{run_dir}: {shown}; {summary['failed']['count']} failed; written to {target}")
    console().print(render_table(summaries, title="vtclab rescore"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
