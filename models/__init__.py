"""LLaVA-NeXT through transformers: the embedded tiny model, local checkpoints, and the pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.pipeline import GenerationResult, LlavaNextPipeline

LOADERS = ("tiny", "local")


def _check_full_depth(cfg: Mapping[str, Any]) -> None:
    if cfg.get("text_layers") is not None:
        raise ValueError(f"model.text_layers={cfg['text_layers']} builds fewer decoder layers, which only a "
                         "random-weight model can do; set model.random_init=true or model.text_layers=null")


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
        _check_full_depth(cfg)
        from models.loading import load_llava_next

        model, processor = load_llava_next(
            path=cfg["path"], hub_id=cfg.get("hub_id"), dtype=cfg.get("dtype", "float16"),
            device_map=cfg.get("device_map", "auto"), attn_implementation=cfg.get("attn_implementation", "sdpa"),
            max_memory=cfg.get("max_memory"),  # a data-parallel process's own GPUs (runners.parallel)
            rebuild=cfg.get("rebuild"),
        )
    else:
        raise ValueError(f"unknown model.loader {loader!r}; allowed: {', '.join(LOADERS)}")
    return LlavaNextPipeline(model, processor, prompt_format=cfg.get("prompt_format", "vicuna_v1"),
                             image_size=cfg.get("image_size"))


@dataclass(frozen=True)
class ModelFacts:
    """What a run needs to know about its model before loading it (from its config, no weights).

    Attributes:
        num_decoder_layers: depth of the language model (an LLM-stage compressor's layer must be below it).
        checkpoint: fingerprint of a local checkpoint (``models.loading.checkpoint_fingerprint``); None for
            the embedded model and random-init architectures, whose settings define them.
    """

    num_decoder_layers: int
    checkpoint: str | None = None


def describe_model(cfg: Mapping[str, Any]) -> ModelFacts:
    """``ModelFacts`` of a ``model`` config; a missing or damaged checkpoint fails here, clearly."""
    loader = cfg.get("loader")
    if loader == "tiny":
        return ModelFacts(num_decoder_layers=int(cfg.get("text_layers", 4)))
    if loader == "local" and cfg.get("random_init"):  # the shipped architecture: its settings define it
        from models.random_arch import shipped_config

        config = shipped_config(cfg["hub_id"], text_layers=cfg.get("text_layers"))
        return ModelFacts(num_decoder_layers=int(config.text_config.num_hidden_layers))
    if loader == "local":
        _check_full_depth(cfg)
        from transformers import LlavaNextConfig

        from models.loading import checkpoint_fingerprint, read_checkpoint_config

        # through transformers: config.json leaves out values equal to the text model's defaults
        config = LlavaNextConfig.from_dict(read_checkpoint_config(cfg["path"], cfg.get("hub_id"), cfg.get("rebuild")))
        return ModelFacts(num_decoder_layers=int(config.text_config.num_hidden_layers),
                          checkpoint=checkpoint_fingerprint(cfg["path"]))
    raise ValueError(f"unknown model.loader {loader!r}; allowed: {', '.join(LOADERS)}")


__all__ = ["GenerationResult", "LlavaNextPipeline", "ModelFacts", "build_pipeline", "describe_model"]
