"""Evaluate one model x compressor x benchmark combination (Hydra entry point).

    python -m runners.evaluate                                   # tiny model, no compression, synthetic
    python -m runners.evaluate compressor=fastv compressor.ratio=0.25
    python -m runners.evaluate -m compressor=random,pooling compressor.ratio=0.5,0.25

Each combination writes to its own run directory, named by what the run is (``runners.identity``):
``samples.jsonl`` (one record per sample, durable as it goes), ``summary.json`` and ``run.json``.
Rerunning the same command resumes: finished samples are skipped and the final files equal those
of an uninterrupted run (timings aside).

Order of work: ``prepare_run`` makes every check that can refuse the run (settings, checkpoint,
model depth, run directory) and touches nothing; only then does ``RunStore`` lock and open the
directory, and ``.hydra/`` and the log are written there.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import runners.schema  # noqa: F401  (registers the structured-config schemas)
from benchmarks import Benchmark, Sample, build_benchmark
from benchmarks.base import SampleError
from compressors import Compressor, build_compressor, get_compressor_class
from models import GenerationResult, ModelFacts, build_pipeline, describe_model
from models.cost import CostConvention, CostModel
from runners.environment import timing_environment
from runners.errors import ConfigError, RunInterrupted, UsageError, hydra_verbose, reported_errors
from runners.fidelity import FidelityReference
from runners.identity import run_directory, run_identity
from runners.parallel import ProcessGroup, open_run_store, process_model_settings
from runners.report import console, render_table
from runners.scoring import failed_record, summarise_run
from runners.store import RunStore

log = logging.getLogger(__name__)
LOG_FILE = "evaluate.log"
# Absolute, so the entry point finds its configs however it is called (python -m, or main() in-process).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def sample_seed(sample_id: str) -> int:
    """A stable non-negative 63-bit integer per sample (same id, same seed, in any process)."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little") >> 1


# -- checks before anything runs -------------------------------------------------------------------


@dataclass
class RunPlan:
    """A run that passed every check: what to build, where to write, and the identity to keep."""

    settings: dict[str, Any]  # the resolved config (plain containers)
    compressor: Compressor
    benchmark: Benchmark
    ids: list[str]  # the benchmark's sample ids (listing them checks its data root)
    model: ModelFacts
    cost: CostConvention
    identity: dict[str, Any]
    directory: Path


def resolve_settings(cfg: DictConfig | Mapping[str, Any], *, in_sweep: bool = False) -> dict[str, Any]:
    """The resolved config as plain containers; a ``???`` or a broken interpolation is refused by name.

    In a sweep, a method with a fixed ratio (``none``) or an adaptive count (``prumerge_plus``: null)
    takes it whatever ratio the sweep gives, so a ratio sweep runs it once per model x benchmark
    instead of failing.
    """
    if isinstance(cfg, DictConfig):
        missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
        if missing:
            raise ConfigError(f"no value for {', '.join(missing)} (??? in the config); set it on the command line, "
                              f"e.g. {missing[0]}=...")
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        except OmegaConfBaseException as error:  # e.g. an interpolation of a missing value
            where = f" (in {error.full_key})" if getattr(error, "full_key", None) else ""
            raise ConfigError(str(error).strip().splitlines()[0] + where) from None
    settings = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    compressor = dict(settings["compressor"])
    if in_sweep:  # none: its fixed ratio; prumerge_plus: null (adaptive)
        compressor["ratio"] = get_compressor_class(str(compressor.get("name"))).ratio_in_sweep(compressor.get("ratio"))
    settings["compressor"] = compressor
    return settings


def prepare_run(cfg: DictConfig | Mapping[str, Any], *, in_sweep: bool = False, memo: dict | None = None) -> RunPlan:
    """Every check that can refuse the run, before any weight is loaded or any file written.

    Raises a ``UsageError`` (one clear line) for a bad value, an unknown name, a missing or damaged
    checkpoint or data root, or an LLM-stage layer beyond the model's depth (read from its config,
    no weights). ``memo``: model facts and benchmark listings shared by the jobs of a sweep.
    """
    try:
        settings = resolve_settings(cfg, in_sweep=in_sweep)
        threads = settings.get("num_threads")
        if threads is not None and threads < 1:
            raise ValueError(f"num_threads must be a positive integer or null (torch's default), got {threads}")
        compressor = build_compressor(settings["compressor"])
        benchmark = build_benchmark(settings["benchmark"])
        cost = CostConvention(**settings["cost"])
        model = memoised(memo, "model", settings["model"], lambda: describe_model(settings["model"]))
        compressor.check_llm_depth(model.num_decoder_layers)
        ids = memoised(memo, "ids", settings["benchmark"], benchmark.sample_ids)  # a missing data root fails here
    except UsageError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError quotes its str
        raise ConfigError(str(message)) from error
    return RunPlan(settings=settings, compressor=compressor, benchmark=benchmark, ids=ids, model=model, cost=cost,
                   identity=run_identity(settings, checkpoint=model.checkpoint),
                   directory=run_directory(settings))


def memoised(memo: dict | None, kind: str, settings: Mapping[str, Any], compute):
    """``compute()``, or its earlier result for the same ``kind`` and settings when a ``memo`` is given
    (a sweep's check reads each checkpoint and lists each benchmark once, not once per job)."""
    if memo is None:
        return compute()
    key = (kind, json.dumps(settings, sort_keys=True, default=str))
    if key not in memo:
        memo[key] = compute()
    return memo[key]


# -- the run ---------------------------------------------------------------------------------------


class PipelineCache:
    """The last loaded model, kept for the next job of a sweep (jobs usually share their model:
    a 7B checkpoint is loaded once per sweep, not once per method and ratio). Holds at most one:
    the old model is released before another one loads."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.pipeline = None

    def get(self, model_settings: Mapping[str, Any]):
        key = json.dumps(model_settings, sort_keys=True, default=str)
        if key != self.key:
            if self.pipeline is not None:  # free its memory before loading the next model
                self.key, self.pipeline = None, None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.pipeline = build_pipeline(dict(model_settings))
            self.key = key
        return self.pipeline


PIPELINES = PipelineCache()


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
        if result.provenance.weight is not None:  # merging methods: token = sum weight x source (see Provenance)
            record["provenance"].update(weight=result.provenance.weight.tolist(), space=result.provenance.space)
    return record


class RunningStatus:
    """The progress bar's status: accuracy and visual-token count as running means over the run's
    records so far (failed samples and samples without a local score leave the means alone)."""

    def __init__(self) -> None:
        self.scored = self.score = 0.0
        self.counted = self.tokens = 0.0

    def add(self, record: Mapping[str, Any]) -> None:
        if record.get("score") is not None:
            self.scored += 1
            self.score += float(record["score"])
        if record.get("visual_tokens_after") is not None:
            self.counted += 1
            self.tokens += float(record["visual_tokens_after"])

    def __str__(self) -> str:
        parts = [f"acc {100 * self.score / self.scored:.1f}%"] if self.scored else []
        parts += [f"mean tokens {self.tokens / self.counted:.0f}"] if self.counted else []
        return " | ".join(parts)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )


@contextlib.contextmanager
def run_log(directory: Path) -> Iterator[None]:
    """Append this process's log to ``<run dir>/evaluate.log`` while the run is open."""
    handler = logging.FileHandler(directory / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def save_hydra_files(directory: Path, cfg: DictConfig | Mapping[str, Any]) -> None:
    """Hydra's ``.hydra/`` record, written only once the run is accepted (so it describes the results)."""
    target = directory / ".hydra"
    target.mkdir(exist_ok=True)
    task = OmegaConf.to_container(cfg, enum_to_str=True) if isinstance(cfg, DictConfig) else dict(cfg)
    task.pop("hydra", None)
    OmegaConf.save(OmegaConf.create(task), target / "config.yaml")
    if HydraConfig.initialized():
        OmegaConf.save(HydraConfig.get().overrides.task, target / "overrides.yaml")
        OmegaConf.save(HydraConfig.get(), target / "hydra.yaml")


def evaluate(cfg: DictConfig | Mapping[str, Any], run_dir: str | Path | None = None, *, in_sweep: bool = False,
             pipeline=None) -> dict[str, Any] | None:
    """Run (or resume) one combination; returns the summary (None in the other processes of a
    data-parallel launch, whose main process writes it: see ``runners.parallel``).

    Args:
        cfg: the composed config (``conf/config.yaml``).
        run_dir: the run directory; default ``cfg.run_dir``, else named by the run (``runners.identity``).
        in_sweep: this is one job of a multirun: a fixed-ratio method takes its ratio, and the loaded
            model is kept for the next job.
        pipeline: an already built pipeline for ``cfg.model``; built when there are samples to run.
    """
    group = ProcessGroup.from_environment()
    plan = prepare_run(cfg, in_sweep=in_sweep)
    directory = Path(run_dir) if run_dir is not None else plan.directory
    settings, compressor, benchmark, ids = plan.settings, plan.compressor, plan.benchmark, plan.ids
    if settings.get("num_threads"):
        torch.set_num_threads(int(settings["num_threads"]))

    with open_run_store(directory, plan.identity, resume=settings["resume"], group=group, order=ids,
                        wait=in_sweep) as store, \
            run_log(directory):
        if group.is_main:
            save_hydra_files(directory, cfg)
        done = store.completed_ids()
        todo = [i for i, sample_id in enumerate(ids) if sample_id not in done]
        mine = group.shard(todo)  # data-parallel: a strided share of what is left; else all of it
        log.info("%s: %d samples, %d already done, writing to %s%s", compressor, len(ids), len(ids) - len(todo),
                 directory, f" (process {group.rank} of {group.world_size}: {len(mine)})" if group.distributed else "")
        if mine and pipeline is None:  # the main process has work whenever any is left (it takes todo[0])
            model = process_model_settings(settings["model"], group)  # each process on its own GPU(s)
            pipeline = PIPELINES.get(model) if in_sweep else build_pipeline(model)
        if mine and group.is_main:
            store.record_launch({**timing_environment(pipeline.device),
                                 **({"processes": group.world_size} if group.distributed else {})})
        group.barrier()  # the launch is in run.json before any of its processes writes a record
        if mine:
            cost = CostModel(pipeline.model.config, plan.cost, pipeline.model.dtype, compressor)
            fidelity = (FidelityReference.from_config(OmegaConf.create(settings))
                        if (settings.get("eval") or {}).get("fidelity") else None)
            _run_samples(pipeline, compressor, benchmark, cost, fidelity, store, ids, mine, settings, group)
        group.barrier()  # every process has finished its shard
        if not group.is_main:
            return None
        store.finalise()  # the shards merged into samples.jsonl, in the benchmark's order
        records = store.records(ids)
        summary = summarise_run(benchmark.scorer, records, run={
            "model": settings["model"]["name"],
            "benchmark": benchmark.name,
            "compressor": compressor.describe(),
            "run_dir": str(directory),
            "environment": store.launches,  # what the timings depend on, per launch
            "config": settings,
        })
        store.write_summary(summary)
        for path in benchmark.write_submission(records, directory):
            log.info("submission file: %s", path)
    return summary


def _run_samples(pipeline, compressor: Compressor, benchmark: Benchmark, cost: CostModel,
                 fidelity: FidelityReference | None, store: RunStore, ids: list[str], todo: list[int],
                 settings: Mapping[str, Any], group: ProcessGroup = ProcessGroup()) -> None:
    """Generate, score and store every sample of ``todo`` (with its cost, and its fidelity to the
    uncompressed model when asked); Ctrl-C stops after the last stored one. In a data-parallel
    launch ``todo`` is this process's shard, and only the main process shows its bar."""
    status = RunningStatus()
    for record in store.records(ids):
        status.add(record)
    new = 0
    description = f"{settings['model']['name']} | {compressor.name} | {benchmark.name}"
    total, completed = len(ids), len(ids) - len(todo)
    if group.distributed:
        description += f" | process {group.rank} of {group.world_size}"
        total, completed = len(todo), 0
    try:
        with _progress(settings["progress"] and group.is_main) as progress:
            task = progress.add_task(description, total=total, completed=completed, status=str(status))
            for index in todo:
                try:
                    sample = benchmark[index]
                except SampleError as error:  # malformed record or unreadable image: recorded, the run goes on
                    record = failed_record(ids[index], error)
                else:
                    result = pipeline.generate(sample.image, sample.question, compressor,
                                               max_new_tokens=benchmark.max_new_tokens,
                                               sample_seed=sample_seed(sample.id),
                                               first_token_logits=fidelity is not None)
                    record = {**sample_record(sample, result, benchmark.score(result.text, sample),
                                              settings["save_provenance"]), **cost.sample(result)}
                    if fidelity is not None:
                        record.update(fidelity.compare(pipeline, sample, result, compressor, benchmark.max_new_tokens))
                store.append(record)
                new += 1
                status.add(record)
                progress.update(task, advance=1, status=str(status))
    except KeyboardInterrupt:
        if group.distributed:
            raise RunInterrupted(f"process {group.rank} of {group.world_size}: interrupted after {new} of its "
                                 f"{len(todo)} samples in {store.directory}; rerun the same command (with any "
                                 "number of processes) to resume") from None
        raise RunInterrupted(
            f"interrupted after {len(ids) - len(todo) + new} of {len(ids)} samples ({new} in this launch) in "
            f"{store.directory}; rerun the same command to resume"
        ) from None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    with reported_errors(verbose=hydra_verbose(), in_sweep=in_sweep):
        summary = evaluate(cfg, in_sweep=in_sweep)
    if not in_sweep and summary is not None:  # a multirun prints one table for all its jobs (runners.callbacks)
        console().print(render_table([summary], title=f"vtclab: {summary['run_dir']}"))
    return summary


if __name__ == "__main__":
    # The task function as ``runners.evaluate.main``, not ``__main__.main``: launchers that run jobs in
    # other processes (joblib, submitit) pickle it, and a function of ``__main__`` does not pickle by name.
    from runners.callbacks import print_pending_tables
    from runners.evaluate import main as entry_point

    try:
        entry_point()
    finally:  # a multirun whose jobs ran in other processes, one of them failed: its table all the same
        print_pending_tables()
