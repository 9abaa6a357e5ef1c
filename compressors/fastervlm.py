"""``fastervlm``: FasterVLM (Zhang et al., 2024), "[CLS] attention is all you need", per view.

Faithful, token for token, to the authors' code (``Theia-4869/FasterVLM`` @ f5d5f12,
``llava/model/llava_arch.py``: ``encode_images`` and ``prepare_inputs_labels_for_multimodal``;
``llava/model/multimodal_encoder/clip_encoder.py``: ``feature_select``).

1. Score: the [CLS] row of the feature layer's attention (``attentions[-2]``, layer 22 of 24;
   ``layer``), softmax over all ``1 + P`` keys, the [CLS] key dropped, MEAN over heads. ``[V, P]``.
2. Every view (thumbnail and each crop) keeps its top ``T`` tokens, ``T = floor(P * ratio + 0.5)``
   (the README's settings 144 / 58 / 29 of 576 are 25 / 10 / 5 %, rounded); one ``topk`` over all
   views at once, as theirs. Nothing is merged.
3. Layout: the authors force ``mm_patch_merge_type = 'spatial'`` (overriding the checkpoint's
   ``spatial_unpad``): thumbnail tokens in raster order, then the crops' kept tokens in raster order
   of the whole PADDED canvas; no unpadding, no ``image_newline``. The segment is exactly ``V * T``
   tokens whatever the image's aspect (FasterVLM#8: the paper's LLaVA-NeXT runs use a fixed
   672 x 672 input, 2 x 2 grid, 2,880 tokens; ``model.image_size=672`` reproduces that).

At ``ratio = 1`` every token is kept but the layout is still theirs (padding kept, no newlines), so
``ratio = 1`` is not vanilla (``identity_at_full_ratio = False``).

Paper vs code: no difference is documented, so there is no ``variant``. The forced ``spatial``
layout is the authors' (it makes every view exactly ``T`` tokens); it is kept.

Signal: ``ClsAttention(layer)``, the [CLS] row only, SDPA on (the authors turn on
``output_attentions`` for all 24 CLIP layers). Budget: ``T`` per view, no newlines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from compressors.base import ClsAttention, Compressor, Provenance, VisionInput, VisionOutput
from compressors.budget import Budget
from compressors.geometry import AnyResLayout
from compressors.packing import gather_sources
from compressors.registry import register_compressor

BUDGETS = (Budget(scope="per_view", count_newlines=False),)


def tokens_per_view(tokens: int, ratio: float) -> int:
    """``T = floor(P * ratio + 0.5)``, at least 1: the per-view count a ratio stands for."""
    return max(1, math.floor(tokens * ratio + 0.5))


def mean_cls_attention(logits: torch.Tensor) -> torch.Tensor:
    """``[V, heads, 1 + P]`` [CLS] logits -> ``[V, P]``: softmax over all keys, [CLS] key dropped, head mean."""
    return logits.softmax(dim=-1)[:, :, 1:].mean(dim=1)


def spatial_layout_sources(keep: torch.Tensor, layout: AnyResLayout) -> torch.Tensor:
    """The authors' forced ``spatial`` layout: kept thumbnail tokens (raster), then kept crop tokens in
    raster order of the whole padded canvas, no newlines. ``keep``: ``[V, P]`` bool. Returns ``[K]`` long."""
    thumbnail = torch.arange(layout.tokens_per_tile, device=keep.device)
    order = torch.cat([thumbnail, layout.canvas_source_ids(keep.device).reshape(-1)])  # [V * P]
    return order[keep.reshape(-1)[order]]


@register_compressor("fastervlm")
class FasterVLM(Compressor):
    """Top ``T`` tokens of every view by the feature layer's head-mean [CLS] attention.

    Args:
        ratio: each view keeps ``floor(576 ratio + 0.5)`` tokens (default 0.25: the README's T = 144).
        layer: CLIP layer of the attention (-2 = 22 of 24, the feature layer).
        budget: must be ``{scope: per_view, count_newlines: false}``.
    """

    identity_at_full_ratio = False  # the forced spatial layout keeps padding and drops newlines

    def __init__(self, ratio: float = 0.25, layer: int = -2, budget: Mapping[str, Any] | None = BUDGETS[0].as_default()) -> None:
        super().__init__(ratio)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"compressor.layer must be an integer CLIP layer index; got {layer!r}")
        self.layer = layer
        self.budget = Budget.parse(budget, BUDGETS)

    @property
    def vision_signals(self) -> tuple[ClsAttention, ...]:
        return (ClsAttention(self.layer),)

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``[V, P]`` scores -> ``[V, P]`` bool, the top ``T`` of every view (one batched ``topk``)."""
        top = torch.topk(scores, k=tokens_per_view(scores.shape[1], self.ratio), dim=1).indices  # [V, T]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        keep = self.keep_mask(mean_cls_attention(inp.signals[ClsAttention(self.layer)]))
        sources = spatial_layout_sources(keep.to(inp.features.device), inp.layout)
        return VisionOutput(embeds=gather_sources(inp.features, inp.newline, sources),
                            provenance=Provenance.one_to_one(sources), num_newlines=0)

    def describe(self) -> dict:
        return {**super().describe(), "layer": self.layer}
