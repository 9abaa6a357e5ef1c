"""LLaVA-NeXT through transformers: the embedded tiny model, local checkpoints, and the pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.pipeline import GenerationResult, LlavaNextPipeline

LOADERS = ("tiny", "local")


def build_pipeline(cfg: Mapping[str, Any]) -> LlavaNextPipeline:
    """A pipeline from a ``model`` config: ``loader: tiny`` (embedded), ``loader: local`` (a path), or
    ``loader: local`` with ``random_init: true`` (the checkpoint's architecture, random weights)."""
    loader = cfg.get("loader")
    if loader == "tiny":
        from models.tiny import build_tiny_llava_next

        model, processor = build_tiny_llava_next(
            seed=cfg.get("seed", 0),
            attn_implementation=cfg.get("attn_implementation", "sdpa"),
            vision_layers=cfg.get("vision_layers", 3),
            text_layers=cfg.get("text_layers", 4),
        )
    elif loader == "local" and cfg.get("random_init"):
        from models.loading import resolve_dtype
        from models.random_arch import build_random_llava_next, random_init_device

        model, processor = build_random_llava_next(
            hub_id=cfg["hub_id"], device=random_init_device(cfg.get("device_map", "auto")),
            dtype=resolve_dtype(cfg.get("dtype", "float16")), text_layers=cfg.get("text_layers"),
            seed=cfg.get("seed", 0), attn_implementation=cfg.get("attn_implementation", "sdpa"),
        )
    elif loader == "local":
        if cfg.get("text_layers") is not None:
            raise ValueError(f"model.text_layers={cfg['text_layers']} builds fewer decoder layers, which only a "
                             "random-weight model can do; set model.random_init=true or model.text_layers=null")
        from models.loading import load_llava_next

        model, processor = load_llava_next(
            path=cfg["path"], hub_id=cfg["hub_id"], dtype=cfg.get("dtype", "float16"),
            device_map=cfg.get("device_map", "auto"), attn_implementation=cfg.get("attn_implementation", "sdpa"),
        )
    else:
        raise ValueError(f"unknown model.loader {loader!r}; allowed: {', '.join(LOADERS)}")
    return LlavaNextPipeline(model, processor, prompt_format=cfg.get("prompt_format", "vicuna_v1"))


__all__ = ["GenerationResult", "LlavaNextPipeline", "build_pipeline"]
