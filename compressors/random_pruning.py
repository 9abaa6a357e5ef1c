"""``random``: uniform random pruning inside each tile, the control every scored method must beat.

Budget, per image: each tile t (the thumbnail, and every crop) keeps ``floor(N_t * ratio)`` of its
``N_t`` image tokens (576 for the thumbnail; a crop's tokens inside the unpadded box), drawn
uniformly without replacement. Kept tokens stay at their spatial positions and every unpadded
canvas row keeps its ``image_newline``, so the segment has
``floor(576 r) + sum_c floor(N_c r) + H_u`` tokens. ``floor`` matches GlobalCom2's ``int()`` budgets.
"""

from __future__ import annotations

import hashlib

import torch

from compressors.base import Compressor, VisionInput, VisionOutput
from compressors.packing import pack_spatial
from compressors.registry import register_compressor


def random_keep_mask(valid: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Keep ``floor(N_t * ratio)`` uniformly drawn valid tokens in every row (tile).

    Args:
        valid: ``[T, P]`` bool, which tokens may be kept (N_t = valid[t].sum()).
        ratio: fraction in (0, 1].
        generator: a CPU generator; the draw does not depend on the tensors' device.
    Returns:
        ``[T, P]`` bool keep mask, on ``valid``'s device.
    """
    budget = torch.floor(valid.sum(dim=1).double() * ratio).long()  # [T]
    scores = torch.rand(valid.shape, generator=generator).to(valid.device)  # [T, P] in [0, 1)
    scores = scores.masked_fill(~valid, -1.0)  # padding sorts last, never within budget
    order = scores.argsort(dim=1, descending=True)  # [T, P]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(valid.shape[1], device=valid.device).expand_as(order))
    return rank < budget[:, None]


def sample_generator(seed: int, sample_seed: int) -> torch.Generator:
    """A CPU generator seeded from the method seed and the sample, independent of run order."""
    digest = hashlib.sha256(f"{seed}:{sample_seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@register_compressor("random")
class RandomPruning(Compressor):
    """Uniform random pruning per tile (seeded per sample)."""

    def __init__(self, ratio: float = 0.25, seed: int = 0) -> None:
        super().__init__(ratio)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"compressor.seed must be an integer, got {seed!r}")
        self.seed = seed

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        valid = inp.layout.tile_valid_mask("hf", device=inp.features.device)
        keep = random_keep_mask(valid, self.ratio, sample_generator(self.seed, inp.sample_seed))
        return pack_spatial(inp.features, inp.layout, inp.newline, keep=keep)

    def describe(self) -> dict:
        return {**super().describe(), "seed": self.seed}
