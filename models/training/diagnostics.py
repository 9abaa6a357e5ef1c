"""Checks that the trained model's signals mean what they mean in LLaVA-NeXT (reported in the card).

* ``cls_attention_share``: how much of the last CLIP layer's [CLS] attention (GlobalCom2's signal)
  falls on patches that show an object, beside the share of such patches (uniform attention);
* ``ThumbnailOnly``: drops every crop token (the thumbnail and the row newlines stay), so the val
  accuracy without crops shows how much of the task the 336 px thumbnail alone answers.

``python -m models.training.diagnostics --num-samples 500`` scores the shipped weights on val with
the thumbnail alone and uncompressed (the README's figures).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.hires_detail import Scene
from compressors.base import ClsAttention, Compressor, VisionInput, VisionOutput
from compressors.packing import pack_spatial
from models.training.data import image_tiles
from models.training.labels import view_labels
from models.vision import encode_tiles


class ThumbnailOnly(Compressor):
    """Keeps the thumbnail's 576 tokens and the newlines; every crop token is dropped (not registered)."""

    name = "thumbnail_only"
    identity_at_full_ratio = False

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        keep = torch.zeros(inp.layout.num_tiles, inp.layout.tokens_per_tile, dtype=torch.bool,
                           device=inp.features.device)
        keep[0] = True
        return pack_spatial(inp.features, inp.layout, inp.newline, keep=keep)


@torch.no_grad()
def cls_attention_share(model, processor, scenes: list[Scene]) -> dict[str, float]:
    """Mean over views of the [CLS] attention mass (last layer, head-mean logits, softmax over the
    patches) on object patches, and the mean share of object patches."""
    request = ClsAttention(layer=-1)
    vision = model.config.vision_config
    on_objects, share, views = 0.0, 0.0, 0
    for scene in scenes:
        tiles = image_tiles(processor, scene).to(model.device)
        _, signals = encode_tiles(model, tiles, (request,))
        attention = signals[request].float().mean(1)[:, 1:].softmax(-1)  # [T, P]
        labels = view_labels(scene, model.config.image_grid_pinpoints, vision.image_size, vision.patch_size)
        objects = (labels.patch_object >= 0).to(attention.device)  # [T, P]
        on_objects += float((attention * objects).sum())
        share += float(objects.float().mean(-1).sum())
        views += attention.shape[0]
    return {"cls_attention_on_object_patches": on_objects / views, "object_patch_share": share / views}


@torch.no_grad()
def benchmark_accuracy(pipeline, benchmark, compressor: Compressor,
                       on_sample: Callable[[float], None] | None = None) -> dict[str, float]:
    """``benchmark.aggregate`` of the pipeline's answers to every sample with ``compressor``;
    ``on_sample(accuracy so far, %)`` after each (a progress bar)."""
    records = []
    for sample in benchmark:
        result = pipeline.generate(sample.image, sample.question, compressor, benchmark.max_new_tokens)
        records.append({**benchmark.score(result.text, sample), "meta": sample.meta})
        if on_sample is not None:
            on_sample(100 * sum(r["score"] for r in records) / len(records))
    return benchmark.aggregate(records)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks import build_benchmark
    from compressors import build_compressor
    from models import build_pipeline
    from models.training.card import WEIGHTS

    parser = argparse.ArgumentParser(description="Accuracy of tiny_trained with the thumbnail alone and uncompressed.")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--num-samples", type=int, default=500)
    args = parser.parse_args(argv)
    pipeline = build_pipeline({"loader": "local", "path": str(Path(args.weights)), "dtype": "float32",
                               "device_map": "cpu", "prompt_format": "vicuna_v1"})
    benchmark = build_benchmark({"name": "hires_detail", "split": args.split, "num_samples": args.num_samples})
    for label, compressor in (("thumbnail_only", ThumbnailOnly()), ("none", build_compressor({"name": "none"}))):
        print(label, json.dumps({k: round(v, 1) for k, v in benchmark_accuracy(pipeline, benchmark, compressor).items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
