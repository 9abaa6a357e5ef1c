"""Shared fixtures: the tiny model, images for every AnyRes grid, synthetic vision-stage inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import compressors  # noqa: F401  (registers every compressor)
from compressors import AnyResLayout, ClsAttention, Compressor, LayerKeys, VisionInput

# One torch thread per pytest-xdist worker: two 2-thread jobs on these 2 cores oversubscribe them (two
# training runs that way took ~10x longer a step, README).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
CONF = Path(__file__).resolve().parents[1] / "conf"

# (height, width) -> the grid transformers' processor gives it with LLaVA-NeXT-vicuna's pinpoints
IMAGE_SIZES = {
    "2x2": (672, 672),
    "2x2-padded": (480, 640),
    "1x2": (400, 800),
    "2x1": (800, 400),
    "1x3": (300, 1000),
    "3x1": (1000, 300),
}

# Grids (rows, cols) and odd image sizes (H, W) for pure-tensor property tests; 2x3 is forced.
PROPERTY_LAYOUTS = [
    AnyResLayout(1, 2, 24, (397, 811)),
    AnyResLayout(2, 1, 24, (809, 401)),
    AnyResLayout(2, 2, 24, (673, 671)),
    AnyResLayout(2, 2, 24, (481, 641)),
    AnyResLayout(1, 3, 24, (301, 1003)),
    AnyResLayout(3, 1, 24, (1001, 299)),
    AnyResLayout(2, 3, 24, (555, 999)),
]
RATIOS = [1.0, 0.75, 0.5, 0.25, 0.1]


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def vision_input(layout: AnyResLayout, compressor: Compressor, dim: int = 16, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> VisionInput:
    """Random features, newline and every signal ``compressor`` asks for, plus vision-tower features
    (width 8, [CLS] first) and a random projector for methods that merge in CLIP space."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(layout.num_tiles, layout.tokens_per_tile, dim, generator=gen).to(dtype)
    signals = {}
    for request in compressor.vision_signals:
        signals[request] = _fake_signal(request, layout, gen).to(dtype)
    newline = torch.randn(dim, generator=gen).to(dtype)
    vision_gen = torch.Generator().manual_seed(seed + 1)  # a second stream: the draws above stay as they were
    vision = torch.randn(layout.num_tiles, 1 + layout.tokens_per_tile, 8, generator=vision_gen).to(dtype)
    projector = torch.nn.Sequential(torch.nn.Linear(8, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))
    with torch.no_grad():
        for parameter in projector.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=vision_gen) * 0.3)
    return VisionInput(features=features if compressor.uses_projected_features else None, layout=layout,
                       newline=newline, signals=signals, sample_seed=seed, vision_features=vision,
                       projector=projector.to(dtype))


def _fake_signal(request, layout: AnyResLayout, gen: torch.Generator) -> torch.Tensor:
    """A random value of the shape the pipeline gives ``request`` (4 heads; keys of width 4 x 2)."""
    if isinstance(request, ClsAttention):
        return torch.randn(layout.num_tiles, 4, 1 + layout.tokens_per_tile, generator=gen)
    if isinstance(request, LayerKeys):
        return torch.randn(layout.num_tiles, 1 + layout.tokens_per_tile, 4, 2, generator=gen)
    raise AssertionError(f"no fake value for {request!r}: add one to tests/conftest.py")


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny LLaVA-NeXT pipeline (seed 0)."""
    from models import build_pipeline

    return build_pipeline({"loader": "tiny", "name": "tiny", "seed": 0})


@pytest.fixture()
def compose_cfg():
    """``compose_cfg(overrides, **kw)``: ``conf/config.yaml`` composed as Hydra composes it for a run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import runners.schema  # noqa: F401  (registers the structured-config schemas)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides=(), **kw: compose(config_name="config", overrides=list(overrides), **kw)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def images() -> dict[str, Image.Image]:
    return {grid: random_image(h, w, seed=i) for i, (grid, (h, w)) in enumerate(IMAGE_SIZES.items())}


def interrupt_generate(monkeypatch, model, at_call: int = 2) -> None:
    """Make ``model.generate`` raise KeyboardInterrupt (Ctrl-C) at its ``at_call``-th call: a run cut off
    after ``at_call - 1`` samples."""
    generate, calls = model.generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", interrupted)


def masked_reference_logits(model, embeds, keep, prefill_length, layer_k, late=None):
    """Cache-free FastV by masking: layers >= K may attend only to kept prefill positions and to
    every position after the prefill (the generated tokens). Written from the definition, without
    the pruning hook. ``late``: an ``[N, N]`` bool mask (query row, key) to use for layers >= K instead
    (no causal or diagonal added). Returns logits ``[1, N, V]``; rows of pruned positions are meaningless."""
    lm = model.model.language_model
    length = embeds.shape[1]
    positions = torch.arange(length)[None]
    cos_sin = lm.rotary_emb(embeds, positions)
    causal = torch.ones(length, length).tril().bool()
    if late is None:
        allowed = torch.zeros(length, dtype=torch.bool)
        allowed[keep] = True
        allowed[prefill_length:] = True
        late = (causal & allowed[None, :]) | torch.eye(length, dtype=torch.bool)
    neg = torch.finfo(embeds.dtype).min
    masks = [torch.zeros(length, length).masked_fill(~m, neg)[None, None] for m in (causal, late)]
    hidden = embeds
    for index, layer in enumerate(lm.layers):
        hidden = layer(hidden, attention_mask=masks[int(index >= layer_k)], position_embeddings=cos_sin,
                       position_ids=positions)
    return model.lm_head(lm.norm(hidden))
