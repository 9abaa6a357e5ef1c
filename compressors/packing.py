"""Vanilla LLaVA-NeXT packing of tile features into one image segment, with an optional keep mask.

``pack_spatial`` is the one place that lays tokens out as transformers' ``pack_image_features``
does: thumbnail tokens in raster order, then the unpadded crop canvas row by row, each row ended by
``image_newline``. Pruning methods that keep the spatial layout pass a keep mask; every row of the
unpadded box keeps its newline (so the row structure survives pruning, as in vanilla).
"""

from __future__ import annotations

import torch

from compressors.base import Provenance, VisionOutput
from compressors.geometry import NEWLINE_SOURCE, AnyResLayout, UnpadRounding


def spatial_source_order(layout: AnyResLayout, rounding: UnpadRounding = "hf", device=None) -> torch.Tensor:
    """Source ids of the vanilla segment, in splice order; ``-1`` marks a newline.

    Returns ``[side**2 + H_u * (W_u + 1)]`` long: the thumbnail's ids 0..side**2-1, then the
    unpadded canvas rows, each followed by -1.
    """
    box = layout.valid_box(rounding)
    canvas = layout.canvas_source_ids(device)[box.top : box.bottom, box.left : box.right]  # [H_u, W_u]
    newline_col = torch.full((box.height, 1), NEWLINE_SOURCE, dtype=torch.long, device=canvas.device)
    crops = torch.cat([canvas, newline_col], dim=1).reshape(-1)  # [H_u * (W_u + 1)]
    thumb = torch.arange(layout.tokens_per_tile, device=canvas.device)
    return torch.cat([thumb, crops])


def gather_sources(features: torch.Tensor, newline: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Embeddings for a list of source ids (``-1`` -> ``newline``).

    Args:
        features: ``[num_tiles, side**2, D]``.
        newline: ``[D]``.
        sources: ``[K]`` long source ids.
    Returns:
        ``[K, D]``.
    """
    flat = features.reshape(-1, features.shape[-1])  # [num_tiles * side**2, D]
    out = flat[sources.clamp(min=0)]
    is_newline = (sources == NEWLINE_SOURCE).unsqueeze(-1)
    return torch.where(is_newline, newline.to(out.dtype).expand_as(out), out)


def kept_spatial_sources(layout: AnyResLayout, keep: torch.Tensor | None = None, rounding: UnpadRounding = "hf",
                         device=None) -> torch.Tensor:
    """Source ids of the vanilla segment restricted to ``keep`` (``[num_tiles, side**2]`` bool);
    every unpadded row keeps its newline (-1). Returns ``[K]`` long in splice order."""
    order = spatial_source_order(layout, rounding, device=device)  # [N]
    if keep is None:
        return order
    selected = (order == NEWLINE_SOURCE) | keep.reshape(-1)[order.clamp(min=0)]
    return order[selected]


def pack_spatial(
    features: torch.Tensor,
    layout: AnyResLayout,
    newline: torch.Tensor,
    keep: torch.Tensor | None = None,
    rounding: UnpadRounding = "hf",
) -> VisionOutput:
    """Pack tiles the way vanilla LLaVA-NeXT does, dropping tokens where ``keep`` is False.

    Args:
        features: ``[num_tiles, side**2, D]`` thumbnail first, crops row-major.
        layout: geometry of the image (its ``side`` must match ``features``).
        newline: ``[D]`` ``image_newline``.
        keep: optional ``[num_tiles, side**2]`` bool; padding tokens are dropped regardless.
        rounding: unpad rule, ``"hf"`` (transformers) or ``"llava"`` (original LLaVA).
    Returns:
        The segment: kept thumbnail tokens, then each unpadded canvas row's kept tokens + newline.
    """
    order = kept_spatial_sources(layout, keep, rounding, device=features.device)
    num_newlines = layout.valid_box(rounding).height  # every unpadded row keeps its newline
    embeds = gather_sources(features, newline, order)
    return VisionOutput(embeds=embeds, provenance=Provenance.one_to_one(order), num_newlines=num_newlines)
