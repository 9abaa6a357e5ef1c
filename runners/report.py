"""Summaries of runs and the results table: per run, after a multirun, or for any folder of runs.

    python -m runners.report outputs/runs            # table of every run below the folder
    python -m runners.report outputs/runs --csv t.csv
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compressors.registry import compressor_parameters, get_compressor_class
from runners.store import SUMMARY_FILE

TIMING_KEYS = ("vision_s", "compress_s", "prefill_s", "decode_s")
TOKEN_KEYS = ("visual_tokens_before", "visual_tokens_spliced", "visual_tokens_after", "visual_tokens_layer_mean")


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarise(
    records: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, float],
    *,
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """Aggregate per-sample records into the run summary.

    ``retention_actual`` is total visual tokens after / before over the samples (what the LLM's
    last layers really saw), next to the configured ``compressor.ratio``;
    ``retention_layer_mean`` is total layer-mean visual tokens / before (what FastV-style papers
    quote: an LLM-stage method prunes only from layer K on, so it saves less than its last-layer
    count suggests).
    """
    before = sum(r["visual_tokens_before"] for r in records)
    after = sum(r["visual_tokens_after"] for r in records)
    layer_mean = sum(r["visual_tokens_layer_mean"] for r in records)
    return {
        **run,
        "num_samples": len(records),
        "metrics": dict(metrics),
        "tokens": {key: _mean([r[key] for r in records]) for key in TOKEN_KEYS},
        "retention_actual": after / before if before else None,
        "retention_layer_mean": layer_mean / before if before else None,
        "timings_mean_s": {key: _mean([r[key] for r in records]) for key in TIMING_KEYS},
    }


def _non_default(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that differ from the compressor class's defaults (all of them if it is unknown)."""
    try:
        params = compressor_parameters(get_compressor_class(name))
    except ValueError:
        return options
    return {k: v for k, v in options.items()
            if k not in params or params[k].default is inspect.Parameter.empty or params[k].default != v}


def summary_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """One flat table/CSV row of a summary (``options``: settings other than the method's defaults)."""
    compressor = dict(summary.get("compressor", {}))
    name = compressor.pop("name", "?")
    ratio = compressor.pop("ratio", None)
    compressor = _non_default(name, compressor)
    row = {
        "model": summary.get("model"),
        "benchmark": summary.get("benchmark"),
        "compressor": name,
        "ratio": ratio,
        "options": ",".join(f"{k}={v}" for k, v in compressor.items()),
        "n": summary.get("num_samples"),
        **{f"metric/{k}": v for k, v in summary.get("metrics", {}).items()},
        **{f"tokens/{k.removeprefix('visual_tokens_')}": v for k, v in summary.get("tokens", {}).items()},
        "retention_actual": summary.get("retention_actual"),
        "retention_layer_mean": summary.get("retention_layer_mean"),
        **{f"time/{k}": v for k, v in summary.get("timings_mean_s", {}).items()},
        "run_dir": summary.get("run_dir"),
    }
    return row


def collect_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every ``summary.json`` below ``root``, sorted by model, benchmark, compressor, ratio."""
    summaries = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(root).rglob(SUMMARY_FILE))]
    return sorted(summaries, key=lambda s: (str(s.get("model")), str(s.get("benchmark")),
                                            str(s.get("compressor", {}).get("name")),
                                            -float(s.get("compressor", {}).get("ratio") or 0)))


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Rows to CSV (pandas-readable); columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def console() -> Console:
    """A console that does not squeeze the table when output goes to a file or a pipe."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=200)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(summaries: Iterable[Mapping[str, Any]], title: str = "vtclab results") -> Table:
    """A rich table: accuracy, visual tokens, actual retention and mean timings per run.

    Token columns (means per image): ``before`` is vanilla's count, ``last layer`` what the last
    decoder layer sees, ``layer mean`` the mean over decoder layers; the two retention columns
    divide those by ``before``. A vision-stage method has equal last-layer and layer-mean figures;
    an LLM-stage method (FastV) prunes from layer K on, so its layer mean is the fair comparison.
    """
    table = Table(title=title)
    for column in ("model", "benchmark", "compressor", "ratio", "n", "accuracy", "tokens before",
                   "tokens last layer", "tokens layer mean", "retention last layer", "retention layer mean",
                   "vision ms", "compress ms", "prefill ms", "decode ms"):
        table.add_column(column, justify="left" if column in ("model", "benchmark", "compressor") else "right")
    for summary in summaries:
        row = summary_row(summary)
        compressor = row["compressor"] + (f" ({row['options']})" if row["options"] else "")
        times = {k: (v * 1000 if v is not None else None) for k, v in summary.get("timings_mean_s", {}).items()}
        table.add_row(
            str(row["model"]), str(row["benchmark"]), compressor, _fmt(row["ratio"], ".2f"), str(row["n"]),
            _fmt(summary.get("metrics", {}).get("accuracy"), ".1f"),
            _fmt(row.get("tokens/before"), ".0f"), _fmt(row.get("tokens/after"), ".0f"),
            _fmt(row.get("tokens/layer_mean"), ".0f"), _fmt(row["retention_actual"], ".3f"),
            _fmt(row["retention_layer_mean"], ".3f"),
            *(_fmt(times.get(k), ".1f") for k in TIMING_KEYS),
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Table of every run (summary.json) below a folder.")
    parser.add_argument("root", nargs="?", default="outputs/runs")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    summaries = collect_summaries(args.root)
    if not summaries:
        print(f"no {SUMMARY_FILE} found below {args.root}")
        return 1
    console().print(render_table(summaries, title=f"vtclab results: {args.root}"))
    if args.csv:
        write_csv([summary_row(s) for s in summaries], args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
