"""``pooling``: 2-D average pooling of every tile's token grid, keeping the AnyRes layout.

Each tile's ``side x side`` grid (24 x 24) is average-pooled to ``s x s`` with
``s = max(1, round(side * sqrt(ratio)))`` (torch's adaptive windows), the pooled crops are stitched
into a ``rows*s x cols*s`` canvas, unpadded with transformers' rule at that size, and packed like
vanilla LLaVA-NeXT: ``s**2`` thumbnail tokens, then each unpadded pooled row plus a newline.
Budget: ``s**2 + H'_u * (W'_u + 1)`` tokens, ``(H'_u, W'_u)`` the unpadded pooled box. At
ratio 1 the windows are single tokens and the output is vanilla's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compressors.base import Compressor, Provenance, VisionInput, VisionOutput
from compressors.packing import pack_spatial
from compressors.registry import register_compressor


def pooled_side(side: int, ratio: float) -> int:
    """Side of the pooled tile grid: ``max(1, round(side * sqrt(ratio)))``."""
    return max(1, round(side * math.sqrt(ratio)))


def pool_tiles(features: torch.Tensor, side: int, out_side: int) -> torch.Tensor:
    """Average-pool each tile's grid. ``[T, side**2, D]`` -> ``[T, out_side**2, D]``."""
    num_tiles, _, dim = features.shape
    grid = features.transpose(1, 2).reshape(num_tiles, dim, side, side)  # [T, D, S, S]
    pooled = F.adaptive_avg_pool2d(grid, out_side)  # [T, D, s, s]
    return pooled.flatten(2).transpose(1, 2)  # [T, s*s, D]


def adaptive_windows(size: int, out_size: int, device=None) -> torch.Tensor:
    """Membership of input index j in adaptive-pooling window i (torch's floor/ceil rule).

    Returns ``[out_size, size]`` bool.
    """
    i = torch.arange(out_size, device=device)
    start = (i * size) // out_size
    end = ((i + 1) * size + out_size - 1) // out_size
    j = torch.arange(size, device=device)
    return (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])


def expand_pooled_provenance(pooled: Provenance, side: int, out_side: int) -> Provenance:
    """Map provenance in pooled-id space to every original token of each pooling window."""
    windows = adaptive_windows(side, out_side, device=pooled.source.device)  # [s, S]
    tile = pooled.source // (out_side * out_side)
    patch = pooled.source % (out_side * out_side)
    member = windows[patch // out_side][:, :, None] & windows[patch % out_side][:, None, :]  # [M, S, S]
    pair, y, x = member.nonzero(as_tuple=True)
    return Provenance(token=pooled.token[pair], source=tile[pair] * side * side + y * side + x)


@register_compressor("pooling")
class Pooling(Compressor):
    """Average pooling per tile to about ``ratio`` of the tokens, spatial layout kept."""

    def __init__(self, ratio: float = 0.25) -> None:
        super().__init__(ratio)

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        side = inp.layout.side
        out_side = pooled_side(side, self.ratio)
        pooled = pool_tiles(inp.features, side, out_side)
        packed = pack_spatial(pooled, inp.layout.with_side(out_side), inp.newline)
        provenance = expand_pooled_provenance(packed.provenance, side, out_side)
        return VisionOutput(embeds=packed.embeds, provenance=provenance, num_newlines=packed.num_newlines)
