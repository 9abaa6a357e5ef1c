"""A run's scoring, shared by ``runners.evaluate`` and ``runners.rescore`` so both give the same summary.

Failed samples (a malformed record, an unreadable image: ``benchmarks.SampleError``) are stored as
``{"id", "failed": true, "error"}`` records, so a resumed run does not retry them and the summary
counts them; metrics are computed over the other records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.base import Scorer
from models.cost import CostConvention, cost_summary
from runners.report import summarise


def failed_record(sample_id: str, error: BaseException | str) -> dict[str, Any]:
    """The record of a sample that could not be built."""
    return {"id": sample_id, "failed": True, "error": str(error)}


def is_failed(record: Mapping[str, Any]) -> bool:
    return bool(record.get("failed"))


def summarise_run(scorer: Scorer, records: Sequence[Mapping[str, Any]], run: Mapping[str, Any]) -> dict[str, Any]:
    """The run summary: ``runners.report.summarise`` over the scored records, plus ``headline`` (when
    the benchmark has a local score) and ``failed`` (``count`` and the reason per sample id)."""
    scored = [r for r in records if not is_failed(r)]
    failed = [r for r in records if is_failed(r)]
    metrics = scorer.aggregate(scored) if scored else {}
    summary = summarise(scored, metrics, run=run)
    headline = scorer.headline(metrics)
    if headline is not None:
        summary["headline"] = headline
    summary["failed"] = {"count": len(failed), "samples": {r["id"]: r.get("error", "") for r in failed}}
    cost_config = (run.get("config") or {}).get("cost")
    if cost_config is not None:  # the theoretical cost, under the run's own convention
        summary["cost"] = cost_summary(scored, CostConvention(**cost_config))
    return summary


def running_accuracy(scores: Sequence[float | None]) -> str:
    """``acc 42.0% | `` for the progress bar, or "" while nothing has a local score."""
    known = [s for s in scores if s is not None]
    return f"acc {100 * sum(known) / len(known):.1f}% | " if known else ""
