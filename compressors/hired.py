"""``hired``: HiRED (Arif et al., 2024), thumbnail-guided budgets for LLaVA-NeXT's crops.

Faithful, token for token, to the authors' code (``hasanar1f/HiRED`` @ 502d6dd,
``transformers/src/transformers/models/llava_next/modeling_llava_next.py``: ``HiRED_token_selection``,
``HiRED_sub_img_budgets``, ``pack_HiRED_image_features``). Notation: ``V`` views (thumbnail +
``n`` crops), ``P`` tokens per view (576), ``rho`` = ``ratio`` (their ``token_budget_rate``),
``alpha`` (their ``alpha``).

1. Scores, from two CLIP layers' [CLS] attention (post-softmax over all ``1 + P`` keys, the [CLS]
   key dropped, SUMMED over heads): the *content* score of layer 0 (``content_layer``) and the
   *importance* score of layer 22 = the feature layer (``importance_layer``, -2).
2. Budget for the whole image: ``B = int(V * P * rho)``; the thumbnail gets
   ``B_full = min(int(B * alpha), P)``, the crops ``B_sub = min(B - B_full, (V - 1) P)``.
3. Thumbnail: its top ``B_full`` tokens by importance.
4. Crops: ``S`` = the thumbnail's top ``int(P (1 - alpha))`` tokens by CONTENT score; crop i's share is
   the number of S-members in its part of the thumbnail, ``c_i``; its budget
   ``b_i = min(int(float32(c_i / sum c) * B_sub), P)`` (float32, as their tensor arithmetic), and it
   keeps its own top ``b_i`` tokens by importance. Rounding is floor everywhere (total <= B).
5. Packing: thumbnail tokens in raster order, then the crops' kept tokens in raster order of the
   whole canvas restricted to the unpadded box (original LLaVA's ``int()`` unpad rule, as their
   ``unpad_image``); tokens kept in the padding are dropped (the count can fall below B). NO
   ``image_newline`` (their call passes ``image_newline=None``).

At ``ratio = 1`` the authors skip the selection (``if token_budget_rate < 1.0``): every token is
kept, unpadded, without newlines, so ``ratio = 1`` is not vanilla (``identity_at_full_ratio = False``).

Variants (``variant``):

* ``authors`` (default): crop i's part of the thumbnail is the i-th of n consecutive chunks of the
  flattened 24 x 24 map (``spatial_distribution.reshape(h, w, -1)``): horizontal row bands, not the
  region the crop covers. On a 2 x 2 grid a salient top-left quadrant splits the budget between the
  two TOP crops ([b, b, 0, 0]); the bottom crops get nothing.
* ``paper``: crop i's part is the 2-D block of the thumbnail under it (the paper allocates by "image
  partitions"), cut as GlobalCom2 cuts its regions (``compressors.globalcom2.region_index``: blocks of
  ``24 // rows`` x ``24 // cols``, the last row/column of blocks taking the rest; padding is not
  subtracted, the thumbnail being the whole image squashed). The same top-left quadrant gives
  [B_sub, 0, 0, 0]. Everything else is as ``authors``.

Deliberate differences from the authors' code (both variants):

* The authors' fork is transformers 4.42.0.dev0, whose ``get_anyres_image_grid_shape`` returns
  ``(rows, cols)`` while its callers (vanilla and HiRED alike) unpack ``(width, height)``: on a
  non-square grid their crops are laid out transposed before unpadding (transformers #31327, fixed
  by #32314). vtclab lays crops out as the model it runs (transformers 5.x) does. The budgets do
  not depend on this (the chunk counts are flattened back), and square grids (2 x 2, the papers'
  fixed 672 x 672 input) are unaffected.
* ``alpha`` must be in [0, 1): at ``alpha = 1`` their count sum is 0 and the budgets are NaN.
* The ``spatial_budget`` baseline switch of their code (default 0, off) is not offered.

Signals: ``ClsAttention(content_layer)`` and ``ClsAttention(importance_layer)``; only the [CLS]
row is computed, SDPA stays on (their hooks rebuild the full 577 x 577 map per head twice).
Budget: global over the V views' ``V * P`` tokens, newlines not counted (none are emitted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from compressors.base import (
    ClsAttention,
    Compressor,
    Provenance,
    VisionInput,
    VisionOutput,
    check_choice,
)
from compressors.budget import Budget
from compressors.geometry import AnyResLayout
from compressors.globalcom2 import region_index
from compressors.packing import gather_sources, spatial_source_order
from compressors.registry import register_compressor

VARIANTS = ("authors", "paper")
BUDGETS = (Budget(scope="global", count_newlines=False),)


def cls_attention_scores(logits: torch.Tensor) -> torch.Tensor:
    """Per-view scores from ``ClsAttention`` logits ``[V, heads, 1 + P]``: the [CLS] row's softmax
    over all keys, [CLS] key dropped, summed over heads. Returns ``[V, P]``."""
    return logits.softmax(dim=-1)[:, :, 1:].sum(dim=1)


def image_budgets(num_views: int, tokens: int, ratio: float, alpha: float) -> tuple[int, int, int]:
    """``(B, B_full, B_sub)`` for one image, with the authors' int() truncations in their order."""
    total = int(num_views * tokens * ratio)
    full = min(int(total * alpha), tokens)
    sub = min(total - full, (num_views - 1) * tokens)
    return total, full, sub


def crop_shares(content: torch.Tensor, layout: AnyResLayout, alpha: float, variant: str) -> torch.Tensor:
    """How many of the thumbnail's top ``int(P (1 - alpha))`` content tokens fall in each crop's part.

    Args:
        content: ``[P]`` the thumbnail's content scores.
    Returns:
        ``[n]`` int64 counts (row bands for ``authors``, 2-D blocks for ``paper``).
    """
    tokens, crops = content.numel(), layout.num_crops
    top = torch.zeros(tokens, dtype=torch.bool, device=content.device)
    top[content.topk(int(tokens * (1 - alpha)), largest=True).indices] = True
    if variant == "authors":
        if tokens % crops:
            raise ValueError(f"hired variant=authors cuts the {tokens} thumbnail tokens into {crops} equal row "
                             f"bands, which needs {crops} to divide {tokens}; use variant=paper")
        return top.reshape(crops, -1).sum(dim=-1)  # [n]
    region = torch.as_tensor(region_index(layout.side, layout.rows, layout.cols), device=content.device)  # [P]
    return torch.bincount(region[top], minlength=crops)


def crop_budgets(shares: torch.Tensor, sub_budget: int, tokens: int) -> torch.Tensor:
    """``min(int(float32(c_i / sum c) * B_sub), P)`` per crop, in the authors' float32 arithmetic. ``[n]``."""
    ratio = shares / shares.sum()  # int64 / int64 -> float32
    return torch.clamp((ratio * sub_budget).int(), max=tokens)


def hired_keep_mask(content: torch.Tensor, importance: torch.Tensor, layout: AnyResLayout, ratio: float,
                    alpha: float, variant: str = "authors") -> torch.Tensor:
    """Which tokens of each view HiRED keeps (before unpadding).

    Args:
        content: ``[V, P]`` content scores (only the thumbnail row is used).
        importance: ``[V, P]`` importance scores.
    Returns:
        ``[V, P]`` bool.
    """
    views, tokens = importance.shape
    if ratio >= 1.0:  # the authors skip the selection altogether
        return torch.ones(views, tokens, dtype=torch.bool, device=importance.device)
    _, full, sub = image_budgets(views, tokens, ratio, alpha)
    mask = torch.zeros(views, tokens, dtype=torch.bool, device=importance.device)
    mask[0, importance[0].topk(full, largest=True).indices] = True
    if sub > 0:
        budgets = crop_budgets(crop_shares(content[0], layout, alpha, variant), sub, tokens).tolist()  # one sync
        for crop, budget in enumerate(budgets):  # <= 9 crops; topk per crop, as the authors (same ties)
            mask[crop + 1, importance[crop + 1].topk(budget, largest=True).indices] = True
    return mask


def hired_sources(keep: torch.Tensor, layout: AnyResLayout) -> torch.Tensor:
    """Source ids of the segment: kept thumbnail tokens (raster), then kept crop tokens inside LLaVA's
    unpadded box in canvas raster order; no newlines. ``keep``: ``[V, P]`` bool. Returns ``[K]`` long."""
    order = spatial_source_order(layout, "llava", device=keep.device)  # thumbnail + unpadded canvas, -1 = newline
    order = order[order >= 0]
    return order[keep.reshape(-1)[order]]


@register_compressor("hired")
class HiRED(Compressor):
    """Global budget ``int(V * 576 * ratio)``, a share ``alpha`` to the thumbnail, the rest to the crops
    by the thumbnail's layer-0 [CLS] attention; each view keeps its top layer-22 [CLS]-attention tokens.

    Args:
        ratio: rho, the share of all ``V * 576`` view tokens kept (default 0.2, the authors' HiRED-20%).
        alpha: thumbnail share of the budget, and ``1 - alpha`` the share of thumbnail tokens that
            steer the crop budgets (0.5).
        variant: ``"authors"`` (row-band allocation) or ``"paper"`` (2-D regions).
        content_layer / importance_layer: CLIP layers of the two scores (0 and -2 = 22 of 24).
        budget: must be ``{scope: global, count_newlines: false}`` (the authors' convention).
    """

    identity_at_full_ratio = False  # ratio 1 keeps every unpadded token but emits no newline

    def __init__(self, ratio: float = 0.2, alpha: float = 0.5, variant: str = "authors", content_layer: int = 0,
                 importance_layer: int = -2, budget: Mapping[str, Any] | None = BUDGETS[0].as_default()) -> None:
        super().__init__(ratio)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
            raise ValueError(f"compressor.alpha must be a number in [0, 1) (the thumbnail's share of the budget); "
                             f"got {alpha!r}")
        self.alpha = float(alpha)
        self.variant = check_choice("variant", variant, VARIANTS)
        for key, value in (("content_layer", content_layer), ("importance_layer", importance_layer)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"compressor.{key} must be an integer CLIP layer index; got {value!r}")
        self.content_layer, self.importance_layer = content_layer, importance_layer
        self.budget = Budget.parse(budget, BUDGETS)

    @property
    def vision_signals(self) -> tuple[ClsAttention, ...]:
        return tuple(dict.fromkeys((ClsAttention(self.content_layer), ClsAttention(self.importance_layer))))

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        content = cls_attention_scores(inp.signals[ClsAttention(self.content_layer)])  # [V, P]
        importance = cls_attention_scores(inp.signals[ClsAttention(self.importance_layer)])  # [V, P]
        keep = hired_keep_mask(content, importance, inp.layout, self.ratio, self.alpha, self.variant)
        sources = hired_sources(keep.to(inp.features.device), inp.layout)
        return VisionOutput(embeds=gather_sources(inp.features, inp.newline, sources),
                            provenance=Provenance.one_to_one(sources), num_newlines=0)

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha, "variant": self.variant,
                "content_layer": self.content_layer, "importance_layer": self.importance_layer}
