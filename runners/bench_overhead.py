"""How much a compressor's own work costs, next to the vision tower and the LLM prefill it saves.

    python -m runners.bench_overhead                                  # tiny model, CPU
    python -m runners.bench_overhead --arch llava_next_7b --text-layers 2          # full width, CPU
    python -m runners.bench_overhead --arch llava_next_7b --device cuda --dtype float16  # on a GPU

For every compressor, on one 672 x 672 image (2 x 2 grid, 2,928 vanilla visual tokens), the
median over ``--repeats`` runs (after a warm-up) of:

* ``vision``: the vision tower + projector, no signals (what vanilla LLaVA-NeXT runs);
* ``signals``: computing the compressor's declared vision signals (timed inside ``encode_tiles``);
* ``compress``: the vision-stage ``compress_vision`` call;
* ``llm_stage``: for LLM-stage methods, the attention row + selection inside the prefill
  (timed inside the hook);
* ``prefill``: one forward over the vanilla prompt and over the compressed prompt, logits of the
  last position only (as ``generate``'s prefill).

``overhead`` = (signals + compress + llm_stage) / vanilla prefill: the compressor's own work.
The timers synchronise the device around the part they time. With ``--text-layers`` below the
architecture's depth, prefill is measured on those layers and scaled to the full depth (flagged
``prefill_scaled``). Results go to ``--out`` as JSON and to the console.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.table import Table

from compressors import Compressor, VisionInput, build_compressor, list_compressors
from models.pipeline import LlavaNextPipeline
from models.timing import stopwatch
from models.vision import encode_tiles
from runners.report import console

QUESTION = "What is written in the image?\nAnswer the question using a single word or phrase."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def timed_part(fn: Callable[[dict], object], key: str, repeats: int) -> float:
    """Median of ``timings[key]`` that ``fn(timings)`` records, over ``repeats`` runs after a warm-up."""
    fn({})
    samples = []
    for _ in range(repeats):
        timings: dict[str, float] = {}
        fn(timings)
        samples.append(timings.get(key, 0.0))
    return statistics.median(samples)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median device-synchronised seconds of ``fn`` over ``repeats`` runs after one warm-up."""

    def run(timings: dict[str, float]) -> None:
        with stopwatch(timings, "s", device):
            fn()

    return timed_part(run, "s", repeats)


def default_compressors() -> list[str]:
    return [name for name in list_compressors() if name != "none"]


def measure(pipeline: LlavaNextPipeline, compressor: Compressor, image: Image.Image, repeats: int) -> dict:
    """The compressor's own costs, measured directly, and the prefill over its output."""
    device = pipeline.device
    model = pipeline.model
    prepared = pipeline.prepare(image, QUESTION, compressor)
    tiles = pipeline.processor_inputs(image, QUESTION)["pixel_values"][0, : prepared.layout.num_tiles]
    with torch.inference_mode():
        features, signals = encode_tiles(model, tiles, compressor.vision_signals)
        vision_input = VisionInput(features=features, layout=prepared.layout, newline=model.model.image_newline,
                                   signals=signals)
        result = {
            "signals_s": timed_part(lambda t: encode_tiles(model, tiles, compressor.vision_signals, timings=t),
                                    "signals_s", repeats),
            "compress_s": (timed(lambda: compressor.compress_vision(vision_input), device, repeats)
                           if compressor.llm_layer is None else 0.0),
            "llm_stage_s": timed_part(lambda t: pipeline.forward(prepared, compressor, timings=t, logits_to_keep=1), "llm_select_s",
                                      repeats),
            "prefill_s": timed(lambda: pipeline.forward(prepared, compressor, logits_to_keep=1), device, repeats),
        }
    result["visual_tokens"] = prepared.segment.num_tokens
    return result


def build(args: argparse.Namespace) -> tuple[LlavaNextPipeline, float]:
    """The pipeline and the factor that scales measured prefill time to the full depth."""
    if args.arch == "tiny":
        from models.tiny import build_tiny_llava_next

        model, processor = build_tiny_llava_next(seed=0)
        return LlavaNextPipeline(model.to(args.device, DTYPES[args.dtype]), processor), 1.0
    from models.random_arch import build_random_llava_next, full_depth

    model, processor = build_random_llava_next(args.arch, device=args.device, dtype=DTYPES[args.dtype],
                                               text_layers=args.text_layers)
    depth = full_depth(args.arch)
    built = model.config.text_config.num_hidden_layers
    return LlavaNextPipeline(model, processor), depth / built


def full_depth_prefill(measured: float, compressor: Compressor, depth_factor: float) -> float | None:
    """Prefill time scaled from the built decoder layers to the full depth.

    Vision-stage methods run every layer on the same tokens, so time scales with depth. For an
    LLM-stage method the layers before K are full and the rest pruned; splitting a shallow build's
    time into those parts is too noisy on a CPU to report, so it is left out (None).
    """
    if depth_factor == 1.0:
        return measured
    return measured * depth_factor if compressor.llm_layer is None else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", help="tiny, llava_next_7b or llava_next_13b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--text-layers", type=int, default=None, help="build only this many decoder layers")
    parser.add_argument("--compressors", default=",".join(default_compressors()))
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="outputs/bench/overhead.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    pipeline, depth_factor = build(args)
    device = pipeline.device
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (672, 672, 3), dtype=np.uint8))
    none = build_compressor({"name": "none"})
    vanilla_prepared = pipeline.prepare(image, QUESTION, none)
    tiles = pipeline.processor_inputs(image, QUESTION)["pixel_values"][0, : vanilla_prepared.layout.num_tiles]
    with torch.inference_mode():
        vanilla = {
            "vision": timed(lambda: encode_tiles(pipeline.model, tiles), device, args.repeats),
            "prefill": timed(lambda: pipeline.forward(vanilla_prepared, none, logits_to_keep=1), device, args.repeats),
        }
    vanilla["prefill"] *= depth_factor

    rows = {}
    for name in [n for n in args.compressors.split(",") if n]:
        compressor = build_compressor({"name": name, "ratio": args.ratio})
        result = measure(pipeline, compressor, image, args.repeats)
        result["prefill_s"] = full_depth_prefill(result["prefill_s"], compressor, depth_factor)
        own = result["signals_s"] + result["compress_s"] + result["llm_stage_s"]
        result["overhead_vs_vanilla_prefill"] = own / vanilla["prefill"]
        rows[name] = result

    report = {
        "arch": args.arch, "device": str(device), "dtype": args.dtype, "ratio": args.ratio,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "text_layers_built": pipeline.model.config.text_config.num_hidden_layers,
        "prefill_scaled": depth_factor != 1.0, "depth_factor": depth_factor,
        "image": f"672x672 ({vanilla_prepared.layout.rows}x{vanilla_prepared.layout.cols} grid, "
                 f"{vanilla_prepared.segment.num_tokens} vanilla visual tokens)",
        "vanilla": {"vision_s": vanilla["vision"], "prefill_s": vanilla["prefill"]},
        "compressors": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    scaled = " (scaled from %d layers)" % report["text_layers_built"] if report["prefill_scaled"] else ""
    table = Table(title=f"overhead on {args.arch}, {device}, {args.dtype}, ratio {args.ratio}: "
                        f"vision {vanilla['vision'] * 1e3:.1f} ms, vanilla prefill "
                        f"{vanilla['prefill'] * 1e3:.1f} ms{scaled}")
    for column in ("compressor", "tokens", "signals ms", "compress ms", "llm stage ms", "prefill ms",
                   "overhead % of prefill"):
        table.add_column(column, justify="left" if column == "compressor" else "right")
    for name, r in rows.items():
        table.add_row(name, str(r["visual_tokens"]), f"{r['signals_s'] * 1e3:.2f}", f"{r['compress_s'] * 1e3:.2f}",
                      f"{r['llm_stage_s'] * 1e3:.2f}",
                      "n/a" if r["prefill_s"] is None else f"{r['prefill_s'] * 1e3:.1f}",
                      f"{100 * r['overhead_vs_vanilla_prefill']:.2f}")
    console().print(table)
    console().print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
