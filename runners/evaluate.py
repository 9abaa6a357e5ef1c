"""Evaluate one model x compressor x benchmark combination (Hydra entry point).

    python -m runners.evaluate                                   # tiny model, no compression, synthetic
    python -m runners.evaluate compressor=fastv compressor.ratio=0.25
    python -m runners.evaluate -m compressor=random,pooling compressor.ratio=0.5,0.25

Each combination writes to its own run directory (derived from the overrides, not the time):
``samples.jsonl`` (one record per sample, durable as it goes), ``summary.json`` and ``run.json``.
Rerunning the same command resumes: finished samples are skipped and the final files equal those
of an uninterrupted run (timings aside).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import runners.resolvers  # noqa: F401  (registers OmegaConf resolvers used in conf/hydra)
import runners.schema  # noqa: F401  (registers the structured-config schemas)
from benchmarks import Benchmark, Sample, build_benchmark
from benchmarks.base import SampleError
from compressors import Compressor, build_compressor
from models import GenerationResult, build_pipeline
from models.cost import CostConvention, CostModel
from runners.fidelity import FidelityReference
from runners.report import console, render_table
from runners.scoring import failed_record, running_accuracy, summarise_run
from runners.store import RunStore

log = logging.getLogger(__name__)

# Settings that do not change results: excluded from the run identity checked on resume.
VOLATILE_KEYS = ("resume", "progress", "num_threads", "save_provenance", "eval")


def sample_seed(sample_id: str) -> int:
    """A stable non-negative 63-bit integer per sample (same id, same seed, in any process)."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little") >> 1


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings that define a run's results (paths and volatile keys left out)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in (*VOLATILE_KEYS, "paths"):
        container.pop(key, None)
    container.get("benchmark", {}).pop("limit", None)  # growing a run's limit extends it
    container.get("benchmark", {}).pop("root", None)  # where the data lives, not what it is
    return container


def sample_record(sample: Sample, result: GenerationResult, score: Mapping[str, Any], save_provenance: bool) -> dict:
    """The JSON record of one finished sample."""
    record = {
        "id": sample.id,
        "prompt": sample.question,
        "prediction": result.text,
        "reference": list(sample.answers),
        **score,
        "grid": f"{result.layout.rows}x{result.layout.cols}",
        "image_hw": list(result.layout.image_hw),
        "visual_tokens_before": result.visual_tokens_before,
        "visual_tokens_spliced": result.visual_tokens_spliced,
        "visual_tokens_after": result.visual_tokens_after,
        "visual_tokens_layer_mean": result.visual_tokens_layer_mean,
        "retention": result.visual_tokens_after / result.visual_tokens_before,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        **result.timings,
        "meta": dict(sample.meta),
    }
    if save_provenance:
        record["provenance"] = {
            "token": result.provenance.token.tolist(),
            "source": result.provenance.source.tolist(),
        }
    return record


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )


def evaluate(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) one combination into ``output_dir``; returns the summary."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    # Everything that can be wrong in the config fails here, before the model loads.
    compressor: Compressor = build_compressor(OmegaConf.to_container(cfg.compressor, resolve=True))
    benchmark: Benchmark = build_benchmark(OmegaConf.to_container(cfg.benchmark, resolve=True))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    convention = CostConvention(**OmegaConf.to_container(cfg.cost, resolve=True, enum_to_str=True))

    ids = benchmark.sample_ids()  # reads the data root: a missing one fails here, before anything is written
    with RunStore(output_dir, identity=run_identity(cfg), resume=cfg.resume) as store:
        done = store.completed_ids()
        todo = [i for i, sample_id in enumerate(ids) if sample_id not in done]
        log.info("%s: %d samples, %d already done, writing to %s", compressor, len(ids), len(ids) - len(todo),
                 output_dir)
        fidelity = FidelityReference.from_config(cfg) if OmegaConf.select(cfg, "eval.fidelity") else None
        if todo:
            pipeline = build_pipeline(model_cfg)
            cost = CostModel(pipeline.model.config, convention, pipeline.model.dtype, compressor)
            scores = [r.get("score") for r in store.records(ids)]
            with _progress(cfg.progress) as progress:
                task = progress.add_task(f"{model_cfg['name']} | {compressor.name} | {benchmark.name}",
                                         total=len(ids), completed=len(ids) - len(todo), status="")
                for index in todo:
                    try:
                        sample = benchmark[index]
                    except SampleError as error:  # malformed record or unreadable image: recorded, the run goes on
                        store.append(failed_record(ids[index], error))
                        progress.update(task, advance=1, status=f"failed: {ids[index]}")
                        continue
                    result = pipeline.generate(sample.image, sample.question, compressor,
                                               max_new_tokens=benchmark.max_new_tokens,
                                               sample_seed=sample_seed(sample.id),
                                               first_token_logits=fidelity is not None)
                    score = benchmark.score(result.text, sample)
                    record = {**sample_record(sample, result, score, cfg.save_provenance), **cost.sample(result)}
                    if fidelity is not None:
                        record.update(fidelity.compare(pipeline, sample, result, compressor, benchmark.max_new_tokens))
                    store.append(record)
                    scores.append(score["score"])
                    status = f"{running_accuracy(scores)}tokens {result.visual_tokens_after}"
                    progress.update(task, advance=1, status=status)
        records = store.records(ids)
        summary = summarise_run(benchmark.scorer, records, run={
            "model": model_cfg["name"],
            "benchmark": benchmark.name,
            "compressor": compressor.describe(),
            "run_dir": str(output_dir),
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        })
        store.write_summary(summary)
        for path in benchmark.write_submission(records, Path(output_dir)):
            log.info("submission file: %s", path)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    summary = evaluate(cfg, output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:  # a multirun prints one table for all jobs at its end
        console().print(render_table([summary], title=f"vtclab: {output_dir}"))
    return summary["metrics"].get("accuracy")


if __name__ == "__main__":
    main()
