"""``prumerge_plus``: PruMerge+ (Shang et al., 2024) per view, as HiRED's LLaVA-NeXT port applies it.

Faithful, token for token, to ``token_prune_merge_advanced_plus(..., if_adaptive=True)`` in
``hasanar1f/HiRED`` @ 502d6dd ``prumerge_llava_next.py`` (the same function as
``42Shawn/LLaVA-PruMerge`` @ 097c041 ``llava/model/multimodal_encoder/clip_encoder.py``), re-written
with vectorised torch (theirs loops over the kept tokens in Python). Per view, ``N = 576`` patches:

1. Score: the LAST CLIP layer's [CLS] attention as ONE head over the full width:
   ``softmax(q_cls . k / sqrt(C))`` over all ``1 + N`` keys, the [CLS] key dropped (``a``, ``[N]``).
   From ``ClsAttention(-1)``'s per-head logits this is ``softmax(sum_h logits_h / sqrt(heads))``.
2. Adaptive count: ``f`` = the share of ``a`` above ``Q3 + 1.5 IQR`` (numpy percentiles, float32, as
   theirs); the top ``int(N f)`` tokens by ``a`` (``topk`` order, descending).
3. PruMerge+ fill: ``s = int(1 / f)``; the indices ``range(0, 575, int(s / 3))`` not already kept are
   appended in ascending order (index 575 is never sampled: their ``arange`` stops at 575).
4. Merge: each kept token i finds the 32 tokens (kept or not, itself excluded) whose last-layer keys
   (full width, ``LayerKeys(-1)``) have the highest cosine similarity, and becomes
   ``x_i + sum_j a_j x_j`` (raw attention weights: the authors' ``/ torch.sum(weights)`` is
   commented out). ``x`` = the feature layer's hidden states (before the projector), the
   neighbours' ORIGINAL states.
5. One extra token ``sum_{j not kept} a_j x_j`` is appended.
6. Per view: [merged kept tokens (topk order, then the fill), extra]; projected; the views are
   concatenated in processing order (thumbnail first). No unpadding, no ``image_newline``, not
   spatial order.

Variants (``variant``):

* ``authors`` (default): the merge as coded, ``x_i + sum_j a_j x_j``.
* ``paper``: the merge as a weighted average by attention, ``x_i + sum_j a_j x_j / sum_j a_j``: the
  authors' own line with its commented-out ``/ torch.sum(weights)`` restored, and how summaries of
  the paper describe the step ("weighted averaging according to attention scores"; the paper's
  full text was not available to check its equation). Selection, fill and the extra token are the
  same.

Deliberate difference (both variants): when no score is an outlier (``f = 0``) the authors' code
divides by zero (``int(1 / f)``); vtclab keeps no top-k token and samples only index 0, the limit of
their rule as ``f -> 0`` (the stride grows past 575). ``f > 1/3``, where their stride would be 0,
cannot occur (at most a quarter of the values lie above Q3).

The count is adaptive (the paper reports about 25 % on LLaVA-1.5), so ``ratio`` must be null
(``adaptive_budget``); the summary reports the real retention. The authors' non-adaptive branch
(marked "for training") is not offered. Budget: per view, adaptive, no newlines.

Signals: ``ClsAttention(-1)`` and ``LayerKeys(-1)`` (their hooks on the last layer's ``q_proj`` /
``k_proj``); SDPA stays on; only the [CLS] row and the keys are computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compressors.base import (
    ClsAttention,
    Compressor,
    LayerKeys,
    Provenance,
    VisionInput,
    VisionOutput,
    check_choice,
)
from compressors.budget import Budget
from compressors.registry import register_compressor

VARIANTS = ("authors", "paper")
BUDGETS = (Budget(scope="per_view", count_newlines=False),)
NEIGHBOURS = 32


def single_head_cls_attention(logits: torch.Tensor) -> torch.Tensor:
    """``[V, heads, 1 + N]`` per-head ``(q_h / sqrt(d)) . k_h`` -> ``[V, N]`` one-head attention.

    ``q . k / sqrt(heads d) = sum_h (q_h . k_h / sqrt(d)) / sqrt(heads)``; softmax over all keys,
    the [CLS] key dropped.
    """
    return (logits.sum(dim=1) / math.sqrt(logits.shape[1])).softmax(dim=-1)[:, 1:]


def outlier_share(attention: torch.Tensor) -> float:
    """Share of ``attention`` ``[N]`` above ``Q3 + 1.5 IQR`` (numpy's linear percentiles on float32)."""
    values = attention.detach().to("cpu", torch.float32).numpy()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return int((values > q3 + 1.5 * (q3 - q1)).sum()) / values.size


def kept_indices(attention: torch.Tensor, share: float) -> torch.Tensor:
    """PruMerge+'s kept tokens of one view: top ``int(N share)`` by attention, then the stride fill.

    Args:
        attention: ``[N]``.
    Returns:
        ``[K]`` long, in the authors' order.
    """
    tokens = attention.numel()
    top = torch.topk(attention, int(tokens * share), largest=True).indices
    stride = int(int(1 / share) / 3) if share > 0 else tokens  # share 0: their 1 / 0; the limit samples index 0
    fill = torch.arange(0, tokens - 1, stride, device=attention.device)
    fill = fill[~torch.isin(fill, top)]
    return torch.cat([top, fill])


def merge_view(features: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, kept: torch.Tensor,
               normalise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge one view's tokens into its kept ones, all kept tokens at once.

    Args:
        features: ``[N, C]`` hidden states; keys: ``[N, C']`` last-layer keys of the patches;
        attention: ``[N]``; kept: ``[K]`` indices.
    Returns:
        ``[K + 1, C]`` merged kept tokens then the extra token; ``[K, 32]`` neighbour indices (by
        decreasing similarity); ``[N - K]`` the pruned indices (ascending).
    """
    tokens = features.shape[0]
    normed = F.normalize(keys, p=2, dim=-1)  # [N, C']
    similarity = normed[kept] @ normed.T  # [K, N]
    similarity[torch.arange(kept.numel(), device=kept.device), kept] = -torch.inf  # a token is not its own neighbour
    neighbours = similarity.topk(NEIGHBOURS, dim=1).indices  # [K, 32]
    weights = attention[neighbours]  # [K, 32]
    if normalise:
        weights = weights / weights.sum(dim=1, keepdim=True)
    merged = features[kept] + (features[neighbours] * weights.unsqueeze(-1)).sum(dim=1)  # [K, C]
    pruned = torch.ones(tokens, dtype=torch.bool, device=kept.device)
    pruned[kept] = False
    pruned = pruned.nonzero().flatten()  # ascending, as their complement_idx
    extra = (features[pruned] * attention[pruned].unsqueeze(-1)).sum(dim=0, keepdim=True)  # [1, C]
    return torch.cat([merged, extra]), neighbours, pruned


@register_compressor("prumerge_plus")
class PruMergePlus(Compressor):
    """Adaptive (IQR) [CLS]-attention pruning, a spatial fill, and a 32-NN key-similarity merge, per view.

    Args:
        ratio: must be null: the count is adaptive.
        variant: ``"authors"`` (raw attention weights) or ``"paper"`` (normalised weights).
        layer: CLIP layer of the attention and keys (-1 = 23 of 24, the authors' ``layers[23]``).
        budget: must be ``{scope: per_view, count_newlines: false}``.
    """

    identity_at_full_ratio = False
    adaptive_budget = True
    uses_projected_features = False  # merges CLIP features, projects only its output

    def __init__(self, ratio: float | None = None, variant: str = "authors", layer: int = -1,
                 budget: Mapping[str, Any] | None = BUDGETS[0].as_default()) -> None:
        if ratio is not None:
            raise ValueError(f"compressor.ratio must be null for prumerge_plus: it chooses its own count per view "
                             f"(IQR outliers of the [CLS] attention); got {ratio!r}")
        self.ratio = None
        self.variant = check_choice("variant", variant, VARIANTS)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"compressor.layer must be an integer CLIP layer index; got {layer!r}")
        self.layer = layer
        self.budget = Budget.parse(budget, BUDGETS)

    @property
    def vision_signals(self) -> tuple:
        return (ClsAttention(self.layer), LayerKeys(self.layer))

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        if inp.vision_features is None:
            raise ValueError("prumerge_plus merges the vision tower's features: VisionInput.vision_features is required")
        features = inp.vision_features[:, 1:]  # [V, N, C]
        device = features.device
        attention = single_head_cls_attention(inp.signals[ClsAttention(self.layer)]).to(device)  # [V, N]
        keys = inp.signals[LayerKeys(self.layer)].flatten(2)[:, 1:].to(device)  # [V, N, C']
        tokens = inp.layout.tokens_per_tile
        pieces, pairs, offset = [], [], 0
        for view in range(features.shape[0]):  # <= 10 views; everything inside a view is batched
            kept = kept_indices(attention[view], outlier_share(attention[view]))
            merged, neighbours, pruned = merge_view(features[view], keys[view], attention[view], kept,
                                                    normalise=self.variant == "paper")
            pieces.append(merged)
            pairs.append(self._provenance(view * tokens, offset, kept, neighbours, pruned, attention[view]))
            offset += merged.shape[0]
        provenance = Provenance(*(torch.cat(parts) for parts in zip(*pairs)), space="vision")
        return VisionOutput(embeds=inp.projector(torch.cat(pieces)), provenance=provenance, num_newlines=0)

    def _provenance(self, first_source: int, offset: int, kept: torch.Tensor, neighbours: torch.Tensor,
                    pruned: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(token, source, weight) of one view's tokens: kept i = itself (1) + neighbours (a_j, or
        a_j / sum a for ``paper``); the extra token = the pruned tokens (a_j)."""
        count = kept.numel()
        weights = attention[neighbours].double()  # [K, 32]
        if self.variant == "paper":
            weights = weights / weights.sum(dim=1, keepdim=True)
        position = offset + torch.arange(count, device=kept.device)
        token = torch.cat([position, position.repeat_interleave(NEIGHBOURS),
                           torch.full_like(pruned, offset + count)])
        source = first_source + torch.cat([kept, neighbours.reshape(-1), pruned])
        weight = torch.cat([torch.ones(count, dtype=torch.float64, device=kept.device), weights.reshape(-1),
                            attention[pruned].double()])
        return token, source, weight

    def describe(self) -> dict:
        return {**super().describe(), "variant": self.variant, "layer": self.layer}
