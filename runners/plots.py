"""The study's figures (PNG), from the report's one-row-per-run frame (``paper_table.runs_frame``).

* ``score_vs_ratio.png``: per benchmark, score against the nominal retention ratio, one line per
  method, the uncompressed run as a dashed line;
* ``pareto.png``: per benchmark, score against cost (``cost.prefill_tflops`` where every run has
  it, else prefill ms), each method's ratios joined, the Pareto front (no run both cheaper and
  better) in grey;
* ``relative_score.png``: the mean relative score (Avg. of the table) against the ratio;
* ``fidelity_vs_ratio.png``: answer agreement, first-token KL and top-1 agreement with the
  uncompressed model against the ratio (means over benchmarks), when the runs have them.

A figure whose numbers do not exist (no finished run, no cost, an upper bound scoring 0) is not
drawn; ``write_plots`` says why instead. With several models, each figure is drawn per model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window (and no display needed)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from runners.paper_table import PAPER_ORDER  # noqa: E402

DPI = 120  # read when a figure is saved


def _finished(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["status"] == "ok") & frame["score"].notna()]


def _benchmarks(frame: pd.DataFrame) -> list[str]:
    names = frame["benchmark"].unique().tolist()
    return sorted(names, key=lambda b: (PAPER_ORDER.index(b) if b in PAPER_ORDER else len(PAPER_ORDER), b))


MARKERS = "osD^vP*X<>"


def _styles(methods: list[str]) -> dict[str, dict]:
    """A colour, marker and size per method; sizes shrink so that coinciding points stay visible."""
    cmap = plt.get_cmap("tab10")
    return {m: {"color": cmap(i % 10), "marker": MARKERS[i % len(MARKERS)], "markersize": max(4.0, 10.0 - 1.5 * i),
                "linestyle": "-"} for i, m in enumerate(sorted(methods))}


def _ratio_axis(ax, ratios: pd.Series) -> None:
    ax.set_xlabel("retention ratio")
    positive = ratios[ratios > 0]
    if len(positive) and positive.max() / positive.min() > 20:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)


def _upper_bound(ax, score: float) -> None:
    """A dashed line at the uncompressed score, inside the axes' limits."""
    ax.axhline(score, color="black", linestyle="--", linewidth=1, label="upper bound (none)")
    low, high = ax.get_ylim()
    pad = 0.05 * ((max(high, score) - min(low, score)) or 1.0)
    ax.set_ylim(min(low, score - pad), max(high, score + pad))


def _panels(count: int, width: float = 4.0, height: float = 3.2):
    cols = min(count, 5)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 2.2, height * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _save(fig, axes, path: Path) -> Path:
    """One legend for the figure, outside the panels (so it hides no point), then the PNG."""
    labels: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(labels.values(), labels.keys(), loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_score_vs_ratio(frame: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Score against retention ratio per benchmark; a line per method; the upper bound dashed."""
    runs = _finished(frame)
    benchmarks = _benchmarks(runs)
    styles = _styles(runs.loc[runs["compressor"] != "none", "method"].unique().tolist())
    fig, axes = _panels(len(benchmarks))
    for ax, benchmark in zip(axes, benchmarks):
        of = runs[runs["benchmark"] == benchmark]
        for method, line in of[of["compressor"] != "none"].groupby("method"):
            line = line.sort_values("ratio")
            ax.plot(line["ratio"], line["score"], label=method, **styles[method])
        for score in of.loc[of["compressor"] == "none", "score"].head(1):
            _upper_bound(ax, float(score))
        unit = of["score_unit"].iloc[0]
        ax.set_title(str(of["score_label"].iloc[0]))
        ax.set_ylabel(f"score ({unit})")
        _ratio_axis(ax, of["ratio"])
    if title:
        fig.suptitle(title)
    return _save(fig, axes, Path(path))


def pareto_front(cost: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (cost <= and score >=, one strictly), by cost."""
    order = np.lexsort((-score, cost))  # cheapest first; at equal cost the best first
    front, best = [], -np.inf
    for i in order:
        if score[i] > best:
            front.append(i)
            best = score[i]
    return np.asarray(front, dtype=int)


def plot_pareto(frame: pd.DataFrame, path: str | Path, cost: str = "prefill_tflops", title: str = "") -> Path:
    """Score against cost per benchmark; each method's ratios joined; the Pareto front in grey."""
    runs = _finished(frame)
    runs = runs[runs[cost].notna()]
    benchmarks = _benchmarks(runs)
    styles = _styles(runs.loc[runs["compressor"] != "none", "method"].unique().tolist())
    fig, axes = _panels(len(benchmarks))
    xlabel = "prefill TFLOPs" if cost == "prefill_tflops" else "prefill ms"
    for ax, benchmark in zip(axes, benchmarks):
        of = runs[runs["benchmark"] == benchmark]
        front = of.iloc[pareto_front(of[cost].to_numpy(float), of["score"].to_numpy(float))]
        ax.step(front[cost], front["score"], where="post", color="grey", linewidth=3, alpha=0.4, label="Pareto front")
        for method, line in of.groupby("method"):
            line = line.sort_values(cost)
            if (line["compressor"] == "none").all():
                ax.plot(line[cost], line["score"], "k*", markersize=11, label="upper bound (none)")
            else:
                ax.plot(line[cost], line["score"], label=method, **styles[method])
        ax.set_title(str(of["score_label"].iloc[0]))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"score ({of['score_unit'].iloc[0]})")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, axes, Path(path))


def mean_over_benchmarks(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """``column`` averaged over benchmarks per method and ratio (rows where it is defined)."""
    runs = _finished(frame)
    runs = runs[runs[column].notna()]
    return runs.groupby(["method", "compressor", "ratio"], as_index=False)[column].mean()


def plot_curves(means: dict[str, pd.DataFrame], path: str | Path, reference: dict[str, float],
                title: str = "") -> Path:
    """One panel per measure (``{ylabel: frame of method, ratio, value}``), a line per method."""
    methods = sorted({m for f in means.values() for m in f.loc[f["compressor"] != "none", "method"]})
    styles = _styles(methods)
    fig, axes = _panels(len(means), width=4.6, height=3.4)
    for ax, (label, table) in zip(axes, means.items()):
        value = table.columns[-1]
        for method, line in table[table["compressor"] != "none"].groupby("method"):
            line = line.sort_values("ratio")
            ax.plot(line["ratio"], line[value], label=method, **styles[method])
        if label in reference:
            _upper_bound(ax, reference[label])
        ax.set_ylabel(label)
        _ratio_axis(ax, table["ratio"])
    if title:
        fig.suptitle(title)
    return _save(fig, axes, Path(path))


def write_plots(frame: pd.DataFrame, out_dir: str | Path) -> dict[str, Path | str]:
    """Every figure that has numbers, per model; ``{name: path}`` or ``{name: why it was not drawn}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Path | str] = {}
    models = sorted(_finished(frame)["model"].unique())
    if not models:
        return {"all figures": "no finished run"}
    for model in models:
        runs = frame[frame["model"] == model]
        suffix = "" if len(models) == 1 else f"_{model}"
        outcome[f"score_vs_ratio{suffix}"] = plot_score_vs_ratio(runs, out_dir / f"score_vs_ratio{suffix}.png", model)
        finished = _finished(runs)
        if finished["prefill_tflops"].notna().all():
            cost = "prefill_tflops"
        elif finished["prefill_ms"].notna().all():
            cost = "prefill_ms"
        else:
            cost = None
        outcome[f"pareto{suffix}"] = (plot_pareto(runs, out_dir / f"pareto{suffix}.png", cost, model) if cost
                                      else "no cost measure (TFLOPs or prefill ms) for every run")
        relative = mean_over_benchmarks(runs, "relative")
        outcome[f"relative_score{suffix}"] = (
            plot_curves({"mean relative score (%)": relative}, out_dir / f"relative_score{suffix}.png",
                        {"mean relative score (%)": 100.0}, model)
            if len(relative) else "no relative score: no uncompressed run with a non-zero score")
        if finished["fid_agreement"].notna().any():
            curves = {"answer agreement with none (%)": mean_over_benchmarks(runs, "fid_agreement"),
                      "first-token KL to none (nats)": mean_over_benchmarks(runs, "fid_kl"),
                      "first-token top-1 agreement (%)": mean_over_benchmarks(runs, "fid_top1")}
            outcome[f"fidelity_vs_ratio{suffix}"] = plot_curves(curves, out_dir / f"fidelity_vs_ratio{suffix}.png",
                                                                {}, model)
        else:
            outcome[f"fidelity_vs_ratio{suffix}"] = "no run has fidelity figures (eval.fidelity=true)"
    return outcome
