"""The table the papers print, from every run found: method @ ratio x benchmark, then Avg., fidelity, cost.

Rows are grouped by retention ratio as GlobalCom2's tables are ("Upper bound" for ``none``, then
"Retain 75%", "Retain 50%", ... with one row per method, options that differ from the method's
defaults in its label). Columns are the benchmarks in the papers' order with the number the papers
print (``summary["headline"]`` when the benchmark gives one, else ``metrics.accuracy``), then

* ``Avg.``: the mean over the row's benchmarks of score / the uncompressed run's score, in %;
* fidelity to the uncompressed model, when the runs have it (``eval.fidelity=true``): answer
  agreement (%), first-token KL (nats), first-token top-1 agreement (%);
* cost: visual tokens per image (mean over decoder layers), ``cost.prefill_tflops`` when present,
  prefill ms; means over the row's benchmarks.

A missing or incomplete run is a gap with a footnote (which run, which file, why), never a zero.
Within each retention group, the best value of every column is bold (highest score, agreement and
Avg.; lowest KL and cost), where at least two rows have a value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from rich.markup import escape as rich_escape
from rich.table import Table

from runners.report import RunScan, compressor_label, format_percent, format_ratio, significant

# GlobalCom2's benchmark order; any other benchmark follows, alphabetically.
PAPER_ORDER = ("gqa", "mmbench", "mmbench_cn", "mme", "pope", "scienceqa_img", "vqav2", "textvqa", "vizwiz",
               "seed_bench")
UPPER_BOUND = "Upper bound"
ADAPTIVE = "Adaptive count"  # the group of methods that choose their own count (ratio null)
GAP = "–"


# -- one row per run -------------------------------------------------------------------------------------


def _name(value: Any) -> str | None:
    """A model/benchmark name from a summary (a string) or a run.json (a config mapping)."""
    if isinstance(value, dict):
        value = value.get("name")
    return None if value is None else str(value)

def _group(name: str, ratio: Any) -> tuple[float, str]:
    """Sort key (upper bound first, then descending ratio) and label of a row's retention group."""
    if name == "none":
        return -math.inf, UPPER_BOUND
    if ratio is None:  # an adaptive count (prumerge_plus): its own group, after every fixed ratio
        return math.inf, ADAPTIVE
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        return math.inf, f"Retain {ratio}"
    return -ratio, f"Retain {format_percent(ratio)}%"


def _method(compressor: dict[str, Any]) -> dict[str, Any]:
    name, ratio, options = compressor_label(compressor)
    key, group = _group(name, ratio)
    return {"compressor": name, "ratio": ratio, "options": options,
            "method": name + (f" ({options})" if options else ""), "group": group, "group_key": key}


def runs_frame(scan: RunScan) -> pd.DataFrame:
    """One row per run (finished or incomplete), the tidy frame the tables and figures are built from."""
    rows = []
    for summary in scan.summaries:
        headline = summary.get("headline") or {}
        fidelity = summary.get("fidelity") or {}
        cost = summary.get("cost") or {}
        timings = summary.get("timings_mean_s") or {}
        tokens = summary.get("tokens") or {}
        benchmark = _name(summary.get("benchmark"))
        prefill_s = timings.get("prefill_s")
        rows.append({
            "model": _name(summary.get("model")), "benchmark": benchmark,
            **_method(dict(summary.get("compressor") or {})),
            "status": "ok", "note": None, "n": summary.get("num_samples"),
            "score": headline.get("value", (summary.get("metrics") or {}).get("accuracy")),
            "score_label": headline.get("label", benchmark), "score_unit": headline.get("unit", "%"),
            "tokens": tokens.get("visual_tokens_layer_mean"),
            "prefill_tflops": cost.get("prefill_tflops"),
            "prefill_ms": None if prefill_s is None else 1000 * prefill_s,
            "fid_agreement": fidelity.get("answer_agreement"), "fid_kl": fidelity.get("first_token_kl"),
            "fid_top1": fidelity.get("first_token_top1"), "fid_samples": fidelity.get("samples"),
            "run_dir": summary.get("run_dir"),
        })
    for run in scan.incomplete:
        settings = run.settings or {}
        if not isinstance(settings.get("compressor"), dict):
            continue  # cannot be placed in a table; listed by the report with its file
        benchmark = _name(settings.get("benchmark"))
        rows.append({"model": _name(settings.get("model")), "benchmark": benchmark, **_method(settings["compressor"]),
                     "status": "incomplete", "note": run.describe(), "score_label": benchmark, "score_unit": "%",
                     "run_dir": str(run.directory)})
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
    numeric = ["ratio", "group_key", "n", "score", "tokens", "prefill_tflops", "prefill_ms", "fid_agreement", "fid_kl",
               "fid_top1", "fid_samples"]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    frame["relative"] = _relative_scores(frame)
    return frame


RUN_COLUMNS = ["model", "benchmark", "compressor", "ratio", "options", "method", "group", "group_key", "status",
               "note", "n", "score", "score_label", "score_unit", "tokens", "prefill_tflops", "prefill_ms",
               "fid_agreement", "fid_kl", "fid_top1", "fid_samples", "run_dir"]


def _relative_scores(frame: pd.DataFrame) -> pd.Series:
    """100 * score / the uncompressed run's score on the same model x benchmark (NaN where undefined)."""
    upper = (frame[(frame["compressor"] == "none") & (frame["status"] == "ok")]
             .sort_values("n", ascending=False).drop_duplicates(["model", "benchmark"])
             .set_index(["model", "benchmark"])["score"])
    keys = pd.MultiIndex.from_frame(frame[["model", "benchmark"]])
    reference = upper.reindex(keys).to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = 100.0 * frame["score"].to_numpy(dtype=float) / reference
    relative[~np.isfinite(relative)] = np.nan
    return pd.Series(relative, index=frame.index)


# -- the table ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column: its header, how its numbers print, and which way is better."""

    header: str
    kind: str  # benchmark | avg | fidelity | cost
    higher_is_better: bool
    fmt: Callable[[float], str]


def _fixed(spec: str) -> Callable[[float], str]:
    return lambda value: format(value, spec)


class Notes:
    """Numbered footnotes, one number per distinct text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


@dataclass
class PaperTable:
    """One model's table.

    ``values`` (float, NaN = gap), ``marks`` (footnote numbers per cell, 0 = none) and ``best``
    (bold) share the index ``(group, method)`` and the columns' headers.
    """

    model: str
    columns: list[Column]
    values: pd.DataFrame
    marks: pd.DataFrame
    best: pd.DataFrame
    ratios: pd.Series
    footnotes: list[str]
    caption: str

    # -- renderings ------------------------------------------------------------------------------------
    def _cells(self, bold: Callable[[str], str], mark: Callable[[int], str], gap: str,
               escape: Callable[[str], str] = str) -> pd.DataFrame:
        cells = pd.DataFrame("", index=self.values.index, columns=self.values.columns, dtype=object)
        for j, column in enumerate(self.columns):
            for i in range(len(self.values)):
                value, note = self.values.iat[i, j], int(self.marks.iat[i, j])
                text = gap if pd.isna(value) else escape(column.fmt(float(value)))
                if self.best.iat[i, j]:
                    text = bold(text)
                cells.iat[i, j] = text + (mark(note) if note else "")
        return cells

    def _flat(self, cells: pd.DataFrame, escape: Callable[[str], str] = str) -> pd.DataFrame:
        """Cells with the group shown once per group (as the papers' section rows) and the method."""
        groups = cells.index.get_level_values(0)
        first = [i == 0 or groups[i] != groups[i - 1] for i in range(len(groups))]
        flat = cells.copy()
        flat.insert(0, "Method", [escape(m) for m in cells.index.get_level_values(1)])
        flat.insert(0, "Retention", [escape(g) if f else "" for g, f in zip(groups, first)])
        flat.columns = ["Retention", "Method", *(escape(c) for c in cells.columns)]
        return flat.reset_index(drop=True)

    def notes(self, mark: Callable[[int], str] | None = None) -> list[str]:
        mark = mark or superscript
        return [self.caption] + [f"{mark(i + 1)} {text}" for i, text in enumerate(self.footnotes)]

    def to_markdown(self) -> str:
        flat = self._flat(self._cells(lambda t: f"**{t}**", superscript, GAP, _markdown_escape), _markdown_escape)
        align = ["left", "left"] + ["right"] * len(self.columns)
        table = flat.to_markdown(index=False, colalign=align)
        return f"### {self.model}\n\n{table}\n\n" + "\n".join(f"{line}  " for line in self.notes()) + "\n"

    def to_latex(self) -> str:
        cells = self._cells(lambda t: t, lambda n: rf"\textsuperscript{{{n}}}", "--", latex_escape)
        cells.index = pd.MultiIndex.from_tuples([(latex_escape(g), latex_escape(m)) for g, m in cells.index],
                                                names=["Retention", "Method"])
        cells.columns = [latex_escape(c.header) for c in self.columns]
        props = pd.DataFrame(np.where(self.best.to_numpy(), "textbf:--rwrap;", ""), index=cells.index,
                             columns=cells.columns)
        styler = cells.style.apply(lambda _: props, axis=None).hide(names=True, axis="index")
        body = styler.to_latex(hrules=True, multirow_align="t", clines="skip-last;data",
                               column_format="ll" + "r" * len(self.columns), position="t",
                               caption=latex_escape(f"{self.model}: {self.caption}"))
        # booktabs rules between the ratio groups, none before the bottom rule
        body = re.sub(r"\\cline\{[0-9-]+\}\n(?=\\bottomrule)", "", body)
        body = re.sub(r"\\cline\{[0-9-]+\}", r"\\midrule", body)
        notes = "\n".join(rf"\textsuperscript{{{i + 1}}} {latex_escape(t)}\\" for i, t in enumerate(self.footnotes))
        return body + (f"% footnotes\n{notes}\n" if notes else "")

    def to_csv(self) -> str:
        """Numbers only (gaps empty), with model, retention group, method and ratio columns."""
        frame = self.values.copy()
        frame.insert(0, "ratio", self.ratios.to_numpy())
        frame = frame.reset_index()
        frame.insert(0, "model", self.model)
        frame.columns = ["model", "retention", "method", "ratio", *(c.header for c in self.columns)]
        return frame.to_csv(index=False)

    def to_rich(self) -> Table:
        cells = self._cells(lambda t: f"[bold]{t}[/bold]", superscript, GAP, rich_escape)
        table = Table(title=f"{self.model}: paper table", title_justify="left")
        table.add_column("Retention")
        table.add_column("Method")
        for column in self.columns:
            table.add_column(rich_escape(column.header), justify="right")
        flat = self._flat(cells, rich_escape)
        for i, row in flat.iterrows():
            if i and row["Retention"]:
                table.add_section()
            table.add_row(*row.tolist())
        return table


_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def superscript(number: int) -> str:
    return str(number).translate(_SUPERSCRIPT)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return re.sub(r"[\\&%$#_{}~^]", lambda m: _LATEX_SPECIAL[m.group()], str(text))


def _markdown_escape(text: str) -> str:
    return str(text).replace("|", r"\|")


def _benchmarks(rows: pd.DataFrame) -> list[str]:
    names = rows["benchmark"].dropna().unique().tolist()
    return sorted(names, key=lambda b: (PAPER_ORDER.index(b) if b in PAPER_ORDER else len(PAPER_ORDER), b))


def _headers(rows: pd.DataFrame, benchmarks: list[str]) -> list[Column]:
    columns, used = [], set()
    for benchmark in benchmarks:
        of = rows[(rows["benchmark"] == benchmark) & (rows["status"] == "ok")]
        label = str(of["score_label"].iloc[0]) if len(of) else benchmark
        if label in used:
            label = f"{label} ({benchmark})"
        used.add(label)
        columns.append(Column(label, "benchmark", True, _fixed(".1f")))
    return columns


def paper_table(frame: pd.DataFrame, model: str) -> PaperTable:
    """The table of one model's runs (``frame`` from ``runs_frame``)."""
    rows = frame[frame["model"] == model]
    benchmarks = _benchmarks(rows)
    columns = _headers(rows, benchmarks)
    index = rows[["group_key", "group", "method"]].drop_duplicates(["group", "method"]).sort_values(
        ["group_key", "method"])
    row_keys = list(zip(index["group"], index["method"]))
    notes = Notes()
    n_rows = len(row_keys)

    scores = np.full((n_rows, len(benchmarks)), np.nan)
    score_marks = np.zeros((n_rows, len(benchmarks)), dtype=int)
    chosen: list[list[pd.Series]] = [[] for _ in row_keys]  # the finished run shown in each cell
    for i, (group, method) in enumerate(row_keys):
        for j, benchmark in enumerate(benchmarks):
            cell = rows[(rows["group"] == group) & (rows["method"] == method) & (rows["benchmark"] == benchmark)]
            done = cell[cell["status"] == "ok"].sort_values("n", ascending=False)
            if len(done):
                run = done.iloc[0]
                chosen[i].append(run)
                scores[i, j] = run["score"]
                if len(done) > 1:
                    others = ", ".join(str(d) for d in done["run_dir"].iloc[1:])
                    score_marks[i, j] = notes.mark(f"{len(done)} runs for one cell; shown: {run['run_dir']} "
                                                   f"({int(run['n'])} samples); also: {others}")
                if pd.isna(run["score"]):
                    score_marks[i, j] = notes.mark(f"{run['run_dir']}: its summary has no score")
            elif len(cell):
                score_marks[i, j] = notes.mark(str(cell["note"].iloc[0]))
            else:
                score_marks[i, j] = notes.mark("no run of this method and ratio on this benchmark")

    extra: list[tuple[Column, np.ndarray, np.ndarray]] = []
    extra.append((Column("Avg. (%)", "avg", True, _fixed(".1f")), *_average(chosen, len(benchmarks), rows, notes)))
    if rows["fid_agreement"].notna().any():
        for key, header, higher, fmt in (("fid_agreement", "Agree (%)", True, _fixed(".1f")),
                                         ("fid_kl", "KL", False, significant),
                                         ("fid_top1", "Top-1 (%)", True, _fixed(".1f"))):
            extra.append((Column(header, "fidelity", higher, fmt), *_fidelity(chosen, key, notes)))
    for key, header, fmt in (("tokens", "Tokens", _fixed(".0f")), ("prefill_tflops", "TFLOPs", significant),
                             ("prefill_ms", "Prefill (ms)", significant)):
        if rows[key].notna().any():
            extra.append((Column(header, "cost", False, fmt), *_means(chosen, key)))

    empty = notes.mark("no finished run in this row") if any(not runs for runs in chosen) else 0
    for _, column_values, column_marks in extra:
        for i, runs in enumerate(chosen):
            if not runs:
                column_marks[i] = empty
    columns += [column for column, _, _ in extra]
    values = np.column_stack([scores, *(v for _, v, _ in extra)]) if extra else scores
    marks = np.column_stack([score_marks, *(m for _, _, m in extra)]) if extra else score_marks
    row_index = pd.MultiIndex.from_tuples(row_keys, names=["Retention", "Method"])
    headers = [c.header for c in columns]
    values_frame = pd.DataFrame(values, index=row_index, columns=headers)
    ratios = pd.Series([rows[(rows["group"] == g) & (rows["method"] == m)]["ratio"].iloc[0] for g, m in row_keys],
                       index=row_index)
    return PaperTable(model=model, columns=columns, values=values_frame,
                      marks=pd.DataFrame(marks, index=row_index, columns=headers),
                      best=_best(values_frame, columns), ratios=ratios, footnotes=notes.texts,
                      caption=_caption(columns, rows))


def _average(chosen: list[list[pd.Series]], n_benchmarks: int, rows: pd.DataFrame,
             notes: Notes) -> tuple[np.ndarray, np.ndarray]:
    """Mean relative score per row, with a footnote where it covers fewer benchmarks or is undefined."""
    values, marks = np.full(len(chosen), np.nan), np.zeros(len(chosen), dtype=int)
    upper = rows[(rows["compressor"] == "none") & (rows["status"] == "ok")]
    for i, runs in enumerate(chosen):
        relative = [float(r["relative"]) for r in runs if not pd.isna(r["relative"])]
        if relative:
            values[i] = float(np.mean(relative))
            if len(relative) < n_benchmarks:
                marks[i] = notes.mark(f"Avg. over the {len(relative)} of {n_benchmarks} benchmarks this row "
                                      "has, relative to the upper bound")
        elif runs:
            if upper.empty:
                marks[i] = notes.mark("Avg. undefined: no finished uncompressed (none) run to compare with")
            elif (upper["score"] == 0).all():
                marks[i] = notes.mark("Avg. undefined: the uncompressed run scores 0 (see the fidelity columns)")
            else:
                marks[i] = notes.mark("Avg. undefined: no benchmark of this row has a finished upper bound "
                                      "with a non-zero score")
    return values, marks


def _fidelity(chosen: list[list[pd.Series]], key: str, notes: Notes) -> tuple[np.ndarray, np.ndarray]:
    values, marks = np.full(len(chosen), np.nan), np.zeros(len(chosen), dtype=int)
    for i, runs in enumerate(chosen):
        have = [r for r in runs if not pd.isna(r[key])]
        if have:
            values[i] = float(np.mean([float(r[key]) for r in have]))
        partial = [r for r in have if r["fid_samples"] < r["n"]]
        if partial:
            r = partial[0]
            marks[i] = notes.mark(f"{r['run_dir']}: fidelity from {int(r['fid_samples'])} of {int(r['n'])} samples "
                                  "(part of the run ran without eval.fidelity; rerun with resume=false)")
        elif runs and len(have) < len(runs):
            marks[i] = notes.mark("fidelity over the benchmarks run with eval.fidelity=true only" if have
                                  else "run without eval.fidelity=true")
    return values, marks


def _means(chosen: list[list[pd.Series]], key: str) -> tuple[np.ndarray, np.ndarray]:
    values = np.full(len(chosen), np.nan)
    for i, runs in enumerate(chosen):
        have = [float(r[key]) for r in runs if not pd.isna(r[key])]
        if have:
            values[i] = float(np.mean(have))
    return values, np.zeros(len(chosen), dtype=int)


def _best(values: pd.DataFrame, columns: list[Column]) -> pd.DataFrame:
    """True where a value is the best of its column within its retention group (upper bound excluded;
    only where at least two rows of the group have a value; ties all bold)."""
    best = pd.DataFrame(False, index=values.index, columns=values.columns)
    groups = values.index.get_level_values(0)
    for group in pd.unique(groups):
        if group == UPPER_BOUND:
            continue
        in_group = groups == group
        for j, column in enumerate(columns):
            block = values.iloc[in_group, j]
            if block.notna().sum() < 2:
                continue
            target = block.max() if column.higher_is_better else block.min()
            hit = np.isclose(block.to_numpy(dtype=float), target, rtol=1e-12, atol=0.0)
            best.iloc[np.flatnonzero(in_group)[hit], j] = True
    return best


def _caption(columns: list[Column], rows: pd.DataFrame) -> str:
    points = sorted(set(rows.loc[(rows["score_unit"] == "points") & (rows["status"] == "ok"), "score_label"]))
    parts = ["Benchmark scores in %" + (f" ({', '.join(points)} in points)" if points else ""),
             "Avg.: mean of score / the upper bound's score, in %"]
    kinds = {c.header for c in columns}
    if "Agree (%)" in kinds:
        parts.append("Agree, KL, Top-1: answer agreement, first-token KL (nats) and top-1 agreement with the "
                     "uncompressed model")
    if "Tokens" in kinds:
        parts.append("Tokens: visual tokens per image, mean over decoder layers")
    parts.append("best per retention group in bold")
    return "; ".join(parts) + "."


def paper_tables(frame: pd.DataFrame) -> list[PaperTable]:
    """One table per model, in name order."""
    models = sorted(m for m in frame["model"].dropna().unique())
    return [paper_table(frame, model) for model in models]


__all__ = ["PAPER_ORDER", "PaperTable", "paper_table", "paper_tables", "runs_frame", "format_ratio"]
