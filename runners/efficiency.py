"""Measured cost beside the theory: prefill, decoding, memory, KV cache and the compressor's own time.

    python -m runners.efficiency                                     # tiny model, globalcom2 r=0.25, CPU
    python -m runners.efficiency -m compressor=random,pooling,fastv,globalcom2 compressor.ratio=0.5,0.25
    python -m runners.efficiency -m experiment=ratio_sweep           # the paper's 4 methods x 4 ratios
    python -m runners.efficiency model=llava_next_7b model.random_init=true model.text_layers=3 \\
        model.dtype=bfloat16 model.device_map=cpu image_hw=[14,300]  # 7B-shaped layers on a CPU
    scripts/efficiency_7b_gpu.sh                                     # full 7B, fp16, SDPA, on a GPU

One job is one model x compressor on one synthetic image (``image_hw``; 672 x 672 gives the 2 x 2
grid and 2,928 vanilla visual tokens of GlobalCom2's efficiency table). Each job measures the
compressor AND vanilla LLaVA-NeXT (``compressor=none``) on the same machine in the same process, so
every speedup compares like with like. After ``warmup`` untimed runs, the median over ``repeats`` of:

* ``vision_s``: CLIP tower + projector, with the compressor's vision signals;
* ``signals_s``, ``compress_s``, ``llm_stage_s``: the compressor's own work (its signals, its
  vision-stage call, its in-LLM scoring + selection), timed where it runs with the device-
  synchronised ``stopwatch``; ``overhead_s`` is their sum (``compress_s`` only for a compressor
  with a vision stage of its own: otherwise it is the vanilla packing every run does), and
  ``overhead_pct_of_vanilla_prefill`` sets it against vanilla's prefill;
* ``prefill_s``: one forward over the compressed prompt (LLM stage included), logits of the last
  position (``generate``'s prefill); ``ttft_s`` = vision + compress + prefill;
* ``decode_s_per_token``: greedy decoding of ``decode_tokens`` tokens (EOS suppressed) with the KV
  cache, time between the first and the last logits over ``decode_tokens - 1`` steps;
* ``kv_cache_mb``: bytes of the KV cache after the prefill; ``peak_memory_mb``: the CUDA allocator's
  peak during that prefill (GPU only).

Beside them, the analytic cost (``models.cost``, convention ``cost=...``): prefill, vision and
per-token decoding TFLOPs and KV MB; speedups against vanilla, measured and theoretical, and their
ratio; achieved TFLOP/s and, on a GPU with a known preset (``device_preset``), its fraction of the
device's peak. Times use CUDA events on a GPU and a synchronised monotonic clock otherwise.

Arguments are checked before anything is built (an LLM-stage layer K beyond the built depth skips
the job with a note), and a random-init model that does not fit the device is refused, with what
to change, before anything is allocated.
Each job writes ``efficiency.json`` and ``efficiency.csv`` in its run directory (an identical rerun
reuses them; ``resume=false`` measures again); a multirun also writes ``efficiency_results.{csv,json}``
in the sweep directory and prints one table, headed by the vanilla baseline.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import LogitsProcessor, LogitsProcessorList

import runners.resolvers  # noqa: F401  (registers OmegaConf resolvers used in conf/hydra)
import runners.schema  # noqa: F401  (registers the structured-config schemas)
from compressors import Compressor, build_compressor, get_compressor_class
from models import LlavaNextPipeline, build_pipeline
from models.cost import MEGA, TERA, CostConvention, CostModel, PrefillTokens, counted_flops
from models.devices import DevicePreset, check_preset_name, resolve_preset
from models.llm_stage import with_decode_mode
from models.timing import DeviceClock, stopwatch
from runners.report import console, write_csv
from runners.store import flatten, write_json_atomic

log = logging.getLogger(__name__)

RESULT_FILE = "efficiency.json"
SWEEP_CSV = "efficiency_results.csv"
SWEEP_JSON = "efficiency_results.json"
# Settings that change neither the measurement nor its theory: left out of a job's identity.
VOLATILE_KEYS = ("resume", "progress", "paths")


# -- arguments ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A checked job: what to build and measure, or why it is skipped."""

    compressor: Compressor
    convention: CostConvention
    model: dict[str, Any]
    built_layers: int
    full_layers: int
    skip: str | None = None


def model_depth(model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(decoder layers the model config builds, the architecture's full depth), without building it."""
    if model_cfg.get("loader") == "tiny":
        layers = int(model_cfg.get("text_layers", 4))
        return layers, layers
    if model_cfg.get("random_init"):
        from models.random_arch import shipped_config

        full = shipped_config(model_cfg["hub_id"]).text_config.num_hidden_layers
        built = model_cfg.get("text_layers")
        if built is not None:  # validated against the depth
            built = shipped_config(model_cfg["hub_id"], built).text_config.num_hidden_layers
        return built or full, full
    from transformers import AutoConfig

    from models.loading import check_checkpoint_dir

    path = check_checkpoint_dir(model_cfg["path"], model_cfg.get("hub_id"), model_cfg.get("rebuild"))
    layers = AutoConfig.from_pretrained(path, local_files_only=True).text_config.num_hidden_layers
    return layers, layers


def check_arguments(cfg: DictConfig) -> Plan:
    """Everything that can be wrong, checked before a model is built (seconds, not minutes in)."""
    check_preset_name(cfg.device_preset)
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={cfg.repeats}, warmup={cfg.warmup}")
    if cfg.decode_tokens < 2:
        raise ValueError(f"decode_tokens must be >= 2 (decoding time is measured between the first and the "
                         f"last token), got {cfg.decode_tokens}")
    if len(cfg.image_hw) != 2 or min(cfg.image_hw) < 1:
        raise ValueError(f"image_hw must be [height, width] in pixels, got {list(cfg.image_hw)}")
    compressor_cfg = OmegaConf.to_container(cfg.compressor, resolve=True)
    method = get_compressor_class(str(compressor_cfg.get("name")))
    fixed = method.fixed_ratio
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    swept_fixed = in_sweep and fixed is not None and compressor_cfg.get("ratio") != fixed
    if in_sweep:  # none in a ratio sweep (experiment=ratio_sweep): its ratio is fixed; prumerge_plus: null
        compressor_cfg["ratio"] = method.ratio_in_sweep(compressor_cfg.get("ratio"))
    compressor = build_compressor(compressor_cfg)
    convention = CostConvention(**OmegaConf.to_container(cfg.cost, resolve=True, enum_to_str=True))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    built, full = model_depth(model_cfg)
    plan = Plan(compressor, convention, model_cfg, built, full)
    if swept_fixed:
        plan.skip = f"{compressor.name} has a fixed ratio ({fixed}); every job measures vanilla beside its compressor"
    layers = tuple(compressor.llm_layers)  # every stage must fit
    if layers and not all(1 <= layer < built for layer in layers):
        what = (f"LLM layer K={layers[0]} needs" if len(layers) == 1 else f"LLM layers K={list(layers)} need")
        plan.skip = (f"{compressor.name}'s {what} at least {max(layers) + 1} decoder layers; the model builds "
                     f"{built}" + (" (model.text_layers)" if built < full else ""))
    return plan


# -- measuring ------------------------------------------------------------------------------------


def synthetic_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


class _DecodeClock(LogitsProcessor):
    """Marks the device timeline each time ``generate`` asks for logits processing (once per token)."""

    def __init__(self, clock: DeviceClock) -> None:
        self.clock = clock
        self.marks: list = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.marks.append(self.clock.mark())
        return scores

    def seconds_per_step(self) -> float:
        """Mean time between consecutive marks: the first token comes from the prefill, each later
        one from one decoding forward, so ``n`` marks span ``n - 1`` steps."""
        if len(self.marks) < 2:
            raise ValueError(f"need at least 2 generated tokens to time a decoding step, got {len(self.marks)}")
        return self.clock.seconds(self.marks[0], self.marks[-1]) / (len(self.marks) - 1)


def cache_bytes(cache) -> int:
    """Bytes held by a transformers ``Cache``'s key and value tensors (every layer)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


PARTS = ("vision_s", "signals_s", "compress_s", "prefill_s", "llm_stage_s", "decode_s_per_token")


class MethodBench:
    """One compressor on one image, ready to time: ``parts`` maps each measured figure to a function
    that runs that part once and returns its seconds. Parts the compressor does not have (no vision
    signals, no LLM stage) return 0 without running anything."""

    def __init__(self, pipeline: LlavaNextPipeline, compressor: Compressor, image: Image.Image, question: str,
                 decode_tokens: int) -> None:
        self.pipeline, self.compressor = pipeline, compressor
        model, device = pipeline.model, pipeline.device
        self.clock = DeviceClock(device)
        # token accounting for the theory (and a first, untimed run)
        self.result = pipeline.generate(image, question, compressor, max_new_tokens=1)
        self.prepared = pipeline.prepare(image, question, compressor)
        view = pipeline.view(image, question, compressor)  # the tiles this method's vision tower sees
        self.view = replace(view, tiles=view.tiles.to(device=device, dtype=model.dtype))
        self.vision_input = pipeline.encode(self.view, compressor)
        self.generation_config = pipeline.generation_config(decode_tokens)
        self.generation_config.min_new_tokens = decode_tokens  # random weights may emit EOS early
        self.decode_marks = 0  # logits calls of the last decode run (one per generated token)
        self.parts: dict[str, Callable[[], float]] = {
            "vision_s": self.vision, "signals_s": self.signals, "compress_s": self.compress,
            "prefill_s": self.prefill, "llm_stage_s": self.llm_stage, "decode_s_per_token": self.decode,
        }

    def vision(self) -> float:
        """CLIP tower + projector with the compressor's signals (no synchronisation inside); methods
        that project only their own output skip the projector here (``compress_s`` has it)."""
        return self.clock.time(lambda: self.pipeline.encode(self.view, self.compressor))

    def signals(self) -> float:
        timings: dict[str, float] = {}
        if self.compressor.vision_signals:
            self.pipeline.encode(self.view, self.compressor, signal_timings=timings)
        return timings.get("signals_s", 0.0)

    def compress(self) -> float:
        timings: dict[str, float] = {}
        with torch.inference_mode(), stopwatch(timings, "compress_s", self.pipeline.device):
            self.compressor.compress_vision(self.vision_input)
        return timings["compress_s"]

    def prefill(self) -> float:
        pipeline = self.pipeline
        return self.clock.time(lambda: pipeline.forward(self.prepared, self.compressor, logits_to_keep=1))

    def llm_stage(self) -> float:
        timings: dict[str, float] = {}
        if self.compressor.llm_layer is not None:
            self.pipeline.forward(self.prepared, self.compressor, timings=timings, logits_to_keep=1)
        return timings.get("llm_select_s", 0.0)

    @torch.inference_mode()
    def decode(self) -> float:
        """Seconds per decoded token: first to last logits of a ``decode_tokens``-token generation."""
        pipeline, marks = self.pipeline, _DecodeClock(self.clock)
        stage = pipeline.llm_stage(self.compressor, self.prepared)
        config = with_decode_mode(self.generation_config, stage)  # FastV's reselect_recompute: no KV cache
        with stage:
            pipeline.model.generate(**pipeline.model_inputs(self.prepared), generation_config=config,
                                    logits_processor=LogitsProcessorList([marks]))
        self.decode_marks = len(marks.marks)
        return marks.seconds_per_step()

    @torch.inference_mode()
    def memory(self) -> dict[str, float | None]:
        """KV-cache MB after one prefill, and the CUDA allocator's peak MB during it (GPU only)."""
        pipeline, device = self.pipeline, self.pipeline.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with pipeline.llm_stage(self.compressor, self.prepared):
            output = pipeline.model(**pipeline.model_inputs(self.prepared), use_cache=True, logits_to_keep=1)
        peak = torch.cuda.max_memory_allocated(device) / MEGA if device.type == "cuda" else None
        return {"kv_cache_mb": cache_bytes(output.cache) / MEGA, "peak_memory_mb": peak}

    def own_compress(self) -> bool:
        """Whether the compressor has a vision stage of its own (else ``compress_s`` is vanilla packing)."""
        return type(self.compressor).compress_vision is not Compressor.compress_vision


def measure_all(benches: Sequence[MethodBench], warmup: int, repeats: int, progress: Progress,
                task) -> list[dict[str, Any]]:
    """Median seconds of every part of every bench. Rounds interleave the benches part by part, so a
    drift in machine load hits vanilla and the compressor alike; the first ``warmup`` rounds are
    not kept."""
    samples = [{part: [] for part in PARTS} for _ in benches]
    for round_index in range(warmup + repeats):
        for part in PARTS:
            for bench, kept in zip(benches, samples):
                seconds = bench.parts[part]()
                if round_index >= warmup:
                    kept[part].append(seconds)
                progress.advance(task)
    measured = []
    for bench, kept in zip(benches, samples):
        figures: dict[str, Any] = {part: statistics.median(values) for part, values in kept.items()}
        figures.update(bench.memory())
        figures["ttft_s"] = figures["vision_s"] + figures["compress_s"] + figures["prefill_s"]
        figures["decode_tokens_timed"] = bench.decode_marks
        measured.append(figures)
    return measured


def theory(cost: CostModel, result) -> dict[str, float]:
    """The analytic figures of one ``GenerationResult``."""
    tokens = PrefillTokens.from_result(result)
    return {
        "prefill_tflops": cost.prefill(tokens)["total"] / TERA,
        "vision_tflops": cost.vision_of(result)["total"] / TERA,
        "decode_tflops_per_token": cost.decode_step(tokens) / TERA,
        "kv_cache_mb": cost.kv_cache(tokens) / MEGA,
    }


def token_counts(result) -> dict[str, float]:
    return {"prompt": result.prompt_tokens, "visual_before": result.visual_tokens_before,
            "visual_spliced": result.visual_tokens_spliced, "visual_after": result.visual_tokens_after,
            "visual_layer_mean": result.visual_tokens_layer_mean}


def overhead_seconds(measured: Mapping[str, float], own_compress: bool) -> float:
    """The compressor's own work: its signals, its vision-stage call (when it has one; otherwise
    ``compress_s`` is the vanilla packing every model does) and its LLM-stage selection."""
    return measured["signals_s"] + (measured["compress_s"] if own_compress else 0.0) + measured["llm_stage_s"]


def compare(method: Mapping[str, Any], vanilla: Mapping[str, Any], peak: float | None) -> dict[str, Any]:
    """Speedups against vanilla (measured, theoretical, their ratio), overhead and achieved throughput."""
    m, v, tm, tv = method["measured"], vanilla["measured"], method["theory"], vanilla["theory"]
    prefill = v["prefill_s"] / m["prefill_s"]
    prefill_theory = tv["prefill_tflops"] / tm["prefill_tflops"]
    ttft_theory = (tv["vision_tflops"] + tv["prefill_tflops"]) / (tm["vision_tflops"] + tm["prefill_tflops"])
    overhead = overhead_seconds(m, method["own_compress"])
    achieved = tm["prefill_tflops"] / m["prefill_s"]
    return {
        "speedup": {
            "prefill": prefill, "prefill_theory": prefill_theory, "prefill_vs_theory": prefill / prefill_theory,
            "ttft": v["ttft_s"] / m["ttft_s"], "ttft_theory": ttft_theory,
            "decode": v["decode_s_per_token"] / m["decode_s_per_token"],
        },
        "overhead_s": overhead,
        "overhead_pct_of_vanilla_prefill": 100 * overhead / v["prefill_s"],
        "achieved_tflops_per_s": achieved,
        "fraction_of_peak": achieved / peak if peak else None,
    }


def flop_check(pipeline: LlavaNextPipeline, compressor: Compressor, image: Image.Image, question: str,
               result) -> dict[str, float]:
    """One prefill counted by ``FlopCounterMode`` against the analytic count under its convention
    (2 FLOPs per MAC, full attention, every token, the last position's LM head: ``cost=default``)."""
    prepared = pipeline.prepare(image, question, compressor)
    counted, _ = counted_flops(lambda: pipeline.forward(prepared, compressor, logits_to_keep=1))
    cost = CostModel(pipeline.model.config, CostConvention(name="flop_counter"), pipeline.model.dtype, compressor)
    analytic = cost.prefill(PrefillTokens.from_result(result))["total"]
    return {"counted_tflops": counted / TERA, "analytic_tflops": analytic / TERA,
            "relative_difference": (counted - analytic) / analytic}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def measure(pipeline: LlavaNextPipeline, plan: Plan, cfg: DictConfig) -> dict[str, Any]:
    """Measure the planned compressor and vanilla on ``pipeline``; the job's record (minus identity)."""
    compressor, convention = plan.compressor, plan.convention
    model, device = pipeline.model, pipeline.device
    preset: DevicePreset | None = resolve_preset(cfg.device_preset, device)
    peak = preset.peak(model.dtype) if preset else None
    image = synthetic_image(*cfg.image_hw)
    none = build_compressor({"name": "none"})
    methods = [none] if compressor.name == "none" else [none, compressor]
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not cfg.progress) as progress:
        task = progress.add_task(f"{plan.model['name']} | {compressor.name} r={compressor.ratio}",
                                 total=len(PARTS) * len(methods) * (cfg.warmup + cfg.repeats))
        benches = [MethodBench(pipeline, method, image, cfg.question, cfg.decode_tokens) for method in methods]
        measured = measure_all(benches, cfg.warmup, cfg.repeats, progress, task)
    blocks = {
        bench.compressor.name: {
            "measured": figures,
            "theory": theory(CostModel(model.config, convention, model.dtype, bench.compressor), bench.result),
            "tokens": token_counts(bench.result),
            "own_compress": bench.own_compress(),
        }
        for bench, figures in zip(benches, measured)
    }
    vanilla, method = blocks["none"], blocks[compressor.name]
    result = benches[-1].result
    record = {
        "model": plan.model["name"],
        "random_weights": bool(plan.model.get("random_init") or plan.model.get("loader") == "tiny"),
        "text_layers_built": plan.built_layers,
        "text_layers_full": plan.full_layers,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "device": str(device),
        "device_name": device_name(device),
        "device_preset": preset.name if preset else None,
        "peak_tflops": peak,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "compressor": compressor.describe(),
        "image_hw": list(cfg.image_hw),
        "grid": f"{result.layout.rows}x{result.layout.cols}",
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "decode_tokens": cfg.decode_tokens,
        "tokens": method["tokens"],
        "measured": method["measured"],
        "theory": method["theory"],
        "own_compress": method["own_compress"],
        "convention": convention.describe(),
        "vanilla": vanilla,
        **compare(method, vanilla, peak),
        "flop_check": flop_check(pipeline, compressor, image, cfg.question, result) if cfg.flop_check else None,
        "skipped": None,
    }
    return record


@functools.lru_cache(maxsize=1)
def _cached_pipeline(model_json: str) -> LlavaNextPipeline:
    """One model per process: a multirun's jobs share it instead of building it again per job."""
    return build_pipeline(json.loads(model_json))


def job_identity(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in VOLATILE_KEYS:
        container.pop(key, None)
    return container


def run_efficiency(cfg: DictConfig, output_dir: str | Path, pipeline: LlavaNextPipeline | None = None) -> dict:
    """Run (or reuse) one efficiency job into ``output_dir``; returns its record.

    ``pipeline`` overrides building the model from ``cfg.model`` (tests pass the shared tiny one).
    """
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    output_dir = Path(output_dir)
    identity = job_identity(cfg)
    path = output_dir / RESULT_FILE
    if cfg.resume and path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("identity") == identity:
            log.info("reusing %s (resume=false measures again)", path)
            return stored
        log.info("%s holds another job's settings; measuring again", path)
    plan = check_arguments(cfg)
    if plan.skip:
        log.warning("skipped: %s", plan.skip)
        record = {"model": plan.model["name"], "compressor": plan.compressor.describe(), "skipped": plan.skip}
    else:
        if pipeline is None:
            pipeline = _cached_pipeline(json.dumps(plan.model, sort_keys=True))
        record = measure(pipeline, plan, cfg)
    record["identity"] = identity
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    write_rows([record], output_dir / "efficiency.csv")
    return record


# -- reporting ------------------------------------------------------------------------------------


def efficiency_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One flat CSV row of a job record (nested keys joined with '.'; identity and convention left out)."""
    flat = flatten({k: v for k, v in record.items() if k not in ("identity", "convention", "compressor")})
    compressor = dict(record.get("compressor", {}))
    return {"compressor": compressor.pop("name", None), "ratio": compressor.pop("ratio", None),
            "options": ",".join(f"{k}={v}" for k, v in compressor.items()),
            "convention": record.get("convention", {}).get("name"), **flat}


def baseline_record(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Vanilla as a row of its own: the median over the jobs of each measured figure (every job
    measured it beside its compressor), the theory and tokens of the first job. ``records`` share
    one setup (``setup_key``)."""
    measured = [r for r in records if not r.get("skipped")]
    if not measured:
        return None
    first = measured[0]
    keys = first["vanilla"]["measured"]
    figures = {key: statistics.median(r["vanilla"]["measured"][key] for r in measured)
               if keys[key] is not None else None for key in keys}
    block = {"measured": figures, "theory": first["vanilla"]["theory"], "own_compress": False}
    base = {k: v for k, v in first.items() if k not in ("vanilla", "flop_check", "identity")}
    return {**base, "compressor": {"name": "none", "ratio": 1.0}, "tokens": first["vanilla"]["tokens"],
            **block, **compare(block, block, first.get("peak_tflops")), "vanilla_jobs": len(measured)}


def setup_key(record: Mapping[str, Any]) -> tuple:
    """What a vanilla baseline is shared by: model, depth, dtype, device, image and convention."""
    return (record.get("model"), record.get("text_layers_built"), record.get("dtype"), record.get("device_name"),
            tuple(record.get("image_hw") or ()), record.get("convention", {}).get("name"))


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def render_efficiency_table(records: Sequence[Mapping[str, Any]], title: str) -> Table:
    """Measured beside theoretical figures, one row per job (a vanilla baseline row first)."""
    table = Table(title=title)
    columns = ("compressor", "ratio", "tokens (last / mean)", "prefill ms", "TFLOPs", "speedup", "theory",
               "meas/theory", "TTFT ms", "decode ms/tok", "KV MB (meas / theory)", "peak MB", "overhead %",
               "TFLOP/s", "of peak")
    for column in columns:
        table.add_column(column, justify="left" if column == "compressor" else "right")
    for record in records:
        name = record["compressor"]["name"]
        if record.get("skipped"):
            table.add_row(name, _fmt(record["compressor"].get("ratio"), ".2f"), f"skipped: {record['skipped']}")
            continue
        m, t, s, tokens = record["measured"], record["theory"], record["speedup"], record["tokens"]
        table.add_row(
            name, _fmt(record["compressor"].get("ratio"), ".2f"),
            f"{tokens['visual_after']} / {tokens['visual_layer_mean']:.0f}",
            _fmt(m["prefill_s"], ".1f", 1e3), _fmt(t["prefill_tflops"], ".3g"),
            _fmt(s["prefill"], ".2f"), _fmt(s["prefill_theory"], ".2f"), _fmt(s["prefill_vs_theory"], ".2f"),
            _fmt(m["ttft_s"], ".1f", 1e3), _fmt(m["decode_s_per_token"], ".2f", 1e3),
            f"{m['kv_cache_mb']:.1f} / {t['kv_cache_mb']:.1f}", _fmt(m["peak_memory_mb"], ".0f"),
            _fmt(record["overhead_pct_of_vanilla_prefill"], ".2f"), _fmt(record["achieved_tflops_per_s"], ".3g"),
            _fmt(record["fraction_of_peak"], ".1%", 1.0),
        )
    return table


def table_title(records: Sequence[Mapping[str, Any]], prefix: str) -> str:
    done = [r for r in records if not r.get("skipped")]
    if not done:
        return prefix
    r = done[0]
    layers = (f"{r['text_layers_built']}/{r['text_layers_full']} decoder layers" if r["text_layers_built"] !=
              r["text_layers_full"] else f"{r['text_layers_built']} decoder layers")
    return (f"{prefix}: {r['model']} ({layers}), {r['dtype']}, {r['attn_implementation']}, {r['device_name']}, "
            f"image {r['image_hw'][0]}x{r['image_hw'][1]} ({r['grid']}), median of {r['repeats']}; "
            f"theory: cost={r['convention']['name']}")


def with_baseline(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records grouped by setup, each group headed by its vanilla baseline row (skipped jobs last)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        if not record.get("skipped"):
            groups.setdefault(setup_key(record), []).append(record)
    rows: list[Mapping[str, Any]] = []
    for group in groups.values():
        rows += [baseline_record(group), *group]
    return rows + [r for r in records if r.get("skipped")]


def write_rows(records: Sequence[Mapping[str, Any]], csv_path: Path, json_path: Path | None = None) -> None:
    """The rows (vanilla baseline first) as CSV, and as a JSON list if ``json_path`` is given."""
    rows = with_baseline(records)
    write_csv([efficiency_row(r) for r in rows], csv_path)
    if json_path is not None:
        write_json_atomic(json_path, rows)


def print_table(records: Sequence[Mapping[str, Any]], prefix: str) -> None:
    console().print(render_efficiency_table(with_baseline(records), table_title(records, prefix)))


class EfficiencyTable(Callback):
    """After a multirun: one table of every job (vanilla first), and ``efficiency_results.{csv,json}``
    in the sweep directory."""

    def __init__(self) -> None:
        self.job_dirs: list[Path] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self.job_dirs.append(Path(HydraConfig.get().runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        paths = ([d / RESULT_FILE for d in self.job_dirs] if self.job_dirs
                 else sorted(sweep_dir.rglob(RESULT_FILE)))
        records = [json.loads(p.read_text(encoding="utf-8")) for p in paths if p.is_file()]
        if records:
            print_table(records, f"efficiency, {len(records)} jobs")
            write_rows(records, sweep_dir / SWEEP_CSV, sweep_dir / SWEEP_JSON)
            console().print(f"written to {sweep_dir / SWEEP_CSV} and {SWEEP_JSON}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="efficiency")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    record = run_efficiency(cfg, output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:  # a multirun prints one table for all jobs at its end
        print_table([record], "efficiency")
        console().print(f"written to {output_dir / RESULT_FILE} and efficiency.csv")


if __name__ == "__main__":
    main()
