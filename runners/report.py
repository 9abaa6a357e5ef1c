"""Run summaries, the runs below some folders (incomplete ones named), and the tables of a study.

    python -m runners.report outputs/runs                        # the paper table of every run below
    python -m runners.report outputs/runs --format latex -o table.tex
    python -m runners.report outputs/runs --format runs --csv all.csv   # one row per run
    python -m runners.report outputs/runs --out report/          # table.{md,tex,csv} + figures

A run directory holds ``run.json`` (its settings), ``samples.jsonl`` (one record per finished
sample) and, once it finished, ``summary.json``. A directory with records but no summary, a
summary older than later records, or a file that does not parse is an incomplete run: it is listed
by file and shown in the tables as a gap with a footnote, never dropped and never a zero.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import logging
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compressors.registry import compressor_parameters, get_compressor_class
from runners.environment import timing_spread
from runners.fidelity import summarise_fidelity
from runners.store import RUN_FILE, SAMPLES_FILE, SHARDS_DIR, SUMMARY_FILE, shard_files

log = logging.getLogger(__name__)

TIMING_KEYS = ("vision_s", "compress_s", "prefill_s", "decode_s")
TOKEN_KEYS = ("visual_tokens_before", "visual_tokens_spliced", "visual_tokens_after", "visual_tokens_layer_mean")
FORMATS = ("rich", "md", "latex", "csv", "runs")


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


# -- one run -----------------------------------------------------------------------------------------


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
    count suggests). ``fidelity`` (means of the records' fidelity figures) is there when records
    have them.
    """
    before = sum(r["visual_tokens_before"] for r in records)
    after = sum(r["visual_tokens_after"] for r in records)
    layer_mean = sum(r["visual_tokens_layer_mean"] for r in records)
    summary = {
        **run,
        "num_samples": len(records),
        "metrics": dict(metrics),
        "tokens": {key: _mean([r[key] for r in records]) for key in TOKEN_KEYS},
        "retention_actual": after / before if before else None,
        "retention_layer_mean": layer_mean / before if before else None,
        "timings_mean_s": {key: _mean([r[key] for r in records]) for key in TIMING_KEYS},
        "timings_s": timing_spread(records, TIMING_KEYS),  # each timing's std and p10/median/p90 with its mean
    }
    fidelity = summarise_fidelity(records)
    if fidelity is not None:
        summary["fidelity"] = fidelity
    return summary


def _shortest(value: float) -> float:
    """``value`` with the digits it has, at most four significant ones (1/9 is not 16 ones)."""
    return float(f"{value:.4g}")


def format_ratio(ratio: Any) -> str:
    """A ratio with the digits it has: 0.001 -> ``0.001``, 0.25 -> ``0.25``, 1.0 -> ``1``, 1/9 -> ``0.1111``."""
    if ratio is None:
        return "-"
    text = repr(_shortest(float(ratio)))
    return text[:-2] if text.endswith(".0") else text


def format_percent(ratio: Any) -> str:
    """A ratio as a percentage with the digits it has: 0.001 -> ``0.1``, 0.25 -> ``25``, 1/9 -> ``11.11``."""
    value = (Decimal(repr(_shortest(float(ratio)))) * 100).normalize()
    return format(value, "f")


def _non_default(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that differ from the compressor class's defaults (all of them if it is unknown)."""
    try:
        params = compressor_parameters(get_compressor_class(name))
    except ValueError:
        return options
    return {k: v for k, v in options.items()
            if k not in params or params[k].default is inspect.Parameter.empty or params[k].default != v}


def compressor_label(compressor: Mapping[str, Any]) -> tuple[str, Any, str]:
    """(name, ratio, options) of a compressor's settings; options: those not at the class default."""
    options = dict(compressor)
    name = str(options.pop("name", "?"))
    ratio = options.pop("ratio", None)
    options = _non_default(name, options)
    return name, ratio, ",".join(f"{k}={v}" for k, v in options.items())


def summary_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """One flat table/CSV row of a summary (``options``: settings other than the method's defaults)."""
    name, ratio, options = compressor_label(summary.get("compressor", {}))
    headline = summary.get("headline") or {}
    row = {
        "model": summary.get("model"),
        "benchmark": summary.get("benchmark"),
        "compressor": name,
        "ratio": ratio,
        "options": options,
        "n": summary.get("num_samples"),
        **{f"metric/{k}": v for k, v in summary.get("metrics", {}).items()},
        **({"headline/label": headline.get("label"), "headline/value": headline.get("value")} if headline else {}),
        **{f"tokens/{k.removeprefix('visual_tokens_')}": v for k, v in summary.get("tokens", {}).items()},
        "retention_actual": summary.get("retention_actual"),
        "retention_layer_mean": summary.get("retention_layer_mean"),
        **{f"time/{k}": v for k, v in summary.get("timings_mean_s", {}).items()},
        **{f"cost/{k}": v for k, v in (summary.get("cost") or {}).items() if not isinstance(v, Mapping)},
        **{f"fidelity/{k}": v for k, v in (summary.get("fidelity") or {}).items()},
        **{f"time/{k}_{stat}": spread[stat] for k, spread in summary.get("timings_s", {}).items()
           for stat in ("std", "p10", "p90")},  # the spread the means come with (runners.environment)
        "run_dir": summary.get("run_dir"),
    }
    return row


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


def _spread_ms(summary: Mapping[str, Any], key: str) -> str:
    """`` ± <std>`` in ms when the summary has the timing's spread."""
    std = summary.get("timings_s", {}).get(key, {}).get("std")
    return "" if std is None else f" ± {std * 1000:.1f}"


def render_table(summaries: Iterable[Mapping[str, Any]], title: str = "vtclab results") -> Table:
    """A rich table, one row per run: accuracy, visual tokens, actual retention, mean timings, and
    fidelity to the uncompressed model when a run has it.

    Token columns (means per image): ``before`` is vanilla's count, ``last layer`` what the last
    decoder layer sees, ``layer mean`` the mean over decoder layers; the two retention columns
    divide those by ``before``. A vision-stage method has equal last-layer and layer-mean figures;
    an LLM-stage method (FastV) prunes from layer K on, so its layer mean is the fair comparison.
    """
    summaries = list(summaries)
    with_fidelity = any(s.get("fidelity") for s in summaries)
    table = Table(title=title)
    columns = ["model", "benchmark", "compressor", "ratio", "n", "accuracy", "tokens before", "tokens last layer",
               "tokens layer mean", "retention last layer", "retention layer mean", "vision ms", "compress ms",
               "prefill ms", "decode ms"]
    if with_fidelity:
        columns += ["agree %", "first-token KL", "top-1 %"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "benchmark", "compressor") else "right")
    for summary in summaries:
        row = summary_row(summary)
        compressor = row["compressor"] + (f" ({row['options']})" if row["options"] else "")
        times = {k: (v * 1000 if v is not None else None) for k, v in summary.get("timings_mean_s", {}).items()}
        cells = [
            str(row["model"]), str(row["benchmark"]), compressor, format_ratio(row["ratio"]), str(row["n"]),
            _fmt(summary.get("metrics", {}).get("accuracy"), ".1f"),
            _fmt(row.get("tokens/before"), ".0f"), _fmt(row.get("tokens/after"), ".0f"),
            _fmt(row.get("tokens/layer_mean"), ".0f"), _fmt(row["retention_actual"], ".3f"),
            _fmt(row["retention_layer_mean"], ".3f"),
            *(_fmt(times.get(k), ".1f") + _spread_ms(summary, k) for k in TIMING_KEYS),
        ]
        if with_fidelity:
            fidelity = summary.get("fidelity") or {}
            cells += [_fmt(fidelity.get("answer_agreement"), ".1f"), significant(fidelity.get("first_token_kl")),
                      _fmt(fidelity.get("first_token_top1"), ".1f")]
        table.add_row(*cells)
    return table


def significant(value: float | None, digits: int = 3) -> str:
    """``digits`` significant digits in fixed notation (0.000123, 12.3, 1234): small values keep theirs."""
    if value is None or value != value:
        return "-"
    if value == 0:
        return "0"
    magnitude = Decimal(repr(abs(float(value)))).adjusted()  # floor(log10 |value|)
    return format(value, f".{max(0, digits - 1 - magnitude)}f")


# -- the runs below some folders ----------------------------------------------------------------------


@dataclass
class IncompleteRun:
    """A run directory that has no usable summary: the file at fault and why.

    ``settings`` is the run's ``run.json`` (model, compressor, benchmark) when it can be read, so
    the tables can put the gap in the right cell.
    """

    directory: Path
    file: Path
    reason: str
    settings: dict[str, Any] | None = None

    def describe(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class RunScan:
    """Every run directory found: finished summaries, and the incomplete runs by file."""

    summaries: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[IncompleteRun] = field(default_factory=list)


def _count_records(path: Path) -> tuple[int, bool]:
    """Complete lines of a JSONL file, and whether it ends in the middle of a line (a torn write)."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count, last != b"\n"


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"unreadable ({type(error).__name__}: {error})"


def inspect_run(directory: Path) -> dict[str, Any] | IncompleteRun:
    """A run directory's summary, or why it has none that can be shown."""
    summary_path, samples_path, run_path = (directory / name for name in (SUMMARY_FILE, SAMPLES_FILE, RUN_FILE))
    settings, _ = _read_json(run_path) if run_path.exists() else (None, None)
    settings = settings if isinstance(settings, dict) else None
    for nested in ("identity", "config"):  # run.json keeps them under "identity" (runners.store)
        if settings is not None and "compressor" not in settings and isinstance(settings.get(nested), dict):
            settings = settings[nested]
    records, torn = _count_records(samples_path) if samples_path.exists() else (0, False)
    shards = [_count_records(path) for path in shard_files(directory)]  # a data-parallel launch's, not merged yet
    records, torn = records + sum(count for count, _ in shards), torn or any(cut for _, cut in shards)
    if shards and summary_path.exists():
        return IncompleteRun(directory, directory / SHARDS_DIR, f"unfinished: {records} records, some in shard files "
                             "not merged yet (killed or still running; rerun the same command to finish)", settings)
    if not summary_path.exists():
        what = f"{records} sample record{'' if records == 1 else 's'}" + (" and a torn last line" if torn else "")
        return IncompleteRun(directory, samples_path if samples_path.exists() else run_path,
                             f"unfinished: no {SUMMARY_FILE}, {what} (killed, failed or still running; "
                             "rerun the same command to resume)", settings)
    summary, problem = _read_json(summary_path)
    if problem:
        return IncompleteRun(directory, summary_path, problem, settings)
    if not isinstance(summary, dict) or "compressor" not in summary or "metrics" not in summary:
        return IncompleteRun(directory, summary_path, "not a runners.evaluate summary (no compressor/metrics)",
                             settings)
    if samples_path.exists():  # records written after the summary: a later, longer run did not finish
        newer = samples_path.stat().st_mtime_ns > summary_path.stat().st_mtime_ns
        if newer and (torn or records != summary.get("num_samples")):
            return IncompleteRun(directory, samples_path,
                                 f"unfinished: {records} records, but {SUMMARY_FILE} (older) covers "
                                 f"{summary.get('num_samples')}; rerun the same command to finish", settings or {
                                     k: summary.get(k) for k in ("model", "benchmark", "compressor")})
    summary.setdefault("run_dir", str(directory))
    return summary


def _run_directories(paths: Iterable[str | Path]) -> list[Path]:
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        for name in (SUMMARY_FILE, SAMPLES_FILE, RUN_FILE):
            found.update(p.parent for p in root.rglob(name) if ".hydra" not in p.parts)
    return sorted(found)


def _sort_key(summary: Mapping[str, Any]) -> tuple:
    compressor = summary.get("compressor") or {}
    return (str(summary.get("model")), str(summary.get("benchmark")), str(compressor.get("name")),
            -float(compressor.get("ratio") or 0))


def scan_runs(paths: Iterable[str | Path]) -> RunScan:
    """Every run directory below ``paths`` (folders of runs or run directories themselves)."""
    scan = RunScan()
    for directory in _run_directories(paths):
        found = inspect_run(directory)
        (scan.incomplete if isinstance(found, IncompleteRun) else scan.summaries).append(found)
    scan.summaries.sort(key=_sort_key)
    return scan


def collect_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every finished run's summary below ``root``, sorted by model, benchmark, compressor, ratio.

    Incomplete runs are logged as warnings (use ``scan_runs`` to get them)."""
    scan = scan_runs([root])
    for run in scan.incomplete:
        log.warning("incomplete run, left out: %s", run.describe())
    return scan.summaries


def print_incomplete(scan: RunScan, out: Console) -> None:
    if scan.incomplete:
        out.print(f"[bold yellow]{len(scan.incomplete)} incomplete run(s), shown as gaps:[/]")
        for run in scan.incomplete:
            out.print(f"  {run.describe()}", highlight=False, soft_wrap=True)


# -- the study: tables and figures ---------------------------------------------------------------------


def write_report(scan: RunScan, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """``table.md``, ``table.tex``, ``table.csv`` (one per model when there are several) and the figures."""
    from runners.paper_table import paper_tables, runs_frame

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(scan)
    written = []
    tables = paper_tables(frame)
    for table in tables:
        stem = "table" if len(tables) == 1 else f"table_{table.model}"
        for suffix, text in (("md", table.to_markdown()), ("tex", table.to_latex()), ("csv", table.to_csv())):
            path = out_dir / f"{stem}.{suffix}"
            path.write_text(text, encoding="utf-8")
            written.append(path)
    if plots:
        from runners.plots import write_plots

        for name, outcome in write_plots(frame, out_dir).items():
            if isinstance(outcome, Path):
                written.append(outcome)
            else:
                log.warning("figure %s not drawn: %s", name, outcome)
    return written


def print_study(scan: RunScan, out: Console) -> None:
    """The paper table(s) on the console, then the incomplete runs."""
    from runners.paper_table import paper_tables, runs_frame

    for table in paper_tables(runs_frame(scan)):
        out.print(table.to_rich())
        for line in table.notes():
            out.print(line, highlight=False, soft_wrap=True)
    print_incomplete(scan, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Tables of every run below some folders: the paper table (method @ ratio x benchmark, "
                    "Avg. relative to the uncompressed run, fidelity and cost columns) or one row per run.")
    parser.add_argument("roots", nargs="*", default=["outputs/runs"], metavar="DIR",
                        help="folders of runs, or run directories (default: outputs/runs)")
    parser.add_argument("--format", choices=FORMATS, default="rich",
                        help="rich: paper table on the console; md / latex / csv: the paper table as text; "
                             "runs: one row per run")
    parser.add_argument("-o", "--output", help="write the md/latex/csv text to this file instead of stdout")
    parser.add_argument("--csv", help="also write one row per run to this CSV file")
    parser.add_argument("--out", help="write table.md, table.tex, table.csv and the figures (PNG) to this folder")
    args = parser.parse_args(argv)
    out = console()
    try:
        scan = scan_runs(args.roots)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    if not scan.summaries and not scan.incomplete:
        print(f"no runs ({SUMMARY_FILE}, {SAMPLES_FILE} or {RUN_FILE}) found below {', '.join(args.roots)}")
        return 1
    if args.format == "rich":
        print_study(scan, out)
    elif args.format == "runs":
        out.print(render_table(scan.summaries, title=f"vtclab runs: {', '.join(args.roots)}"))
        print_incomplete(scan, out)
    else:
        from runners.paper_table import paper_tables, runs_frame

        texts = []
        for table in paper_tables(runs_frame(scan)):
            texts.append({"md": table.to_markdown, "latex": table.to_latex, "csv": table.to_csv}[args.format]())
        text = "\n".join(texts)
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        err = Console(stderr=True, width=200)
        print_incomplete(scan, err)
    if args.csv:
        write_csv([summary_row(s) for s in scan.summaries], args.csv)
    if args.out:
        for path in write_report(scan, args.out):
            out.print(f"wrote {path}", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
