"""``fastv``: FastV (Chen et al., 2024), in-LLM pruning of image tokens at decoder layer K.

As the authors' KV-cache implementation (pkunlp-icler/FastV, llava-hf fork, ``fastv_forward``):

* score: layer K-1's attention probabilities (after softmax), averaged over heads, from the LAST
  prompt token to every image token;
* keep the top ``round(L * (1 - R))`` of the L image tokens, where the authors' R is the dropped
  fraction; here ``R = 1 - ratio`` and the arithmetic is the authors', so float rounding matches;
* every text token is kept; kept positions are re-sorted (original order) and keep their
  original position ids; layers >= K see only them, in prefill and in every decode step
  (the selection is made once, at prefill).

On LLaVA-NeXT the image span is the whole packed segment: thumbnail, crops and ``image_newline``
tokens compete together (the authors' single-image span; their code has no AnyRes handling).
The attention row is computed from layer K-1's own q/k projections; no layer runs eager.
"""

from __future__ import annotations

import torch

from compressors.base import Compressor, LastTokenAttention, LLMInput
from compressors.registry import register_compressor


def fastv_keep_count(num_image_tokens: int, ratio: float) -> int:
    """Image tokens FastV keeps: ``round(L * (1 - R))`` with ``R = 1 - ratio`` (Python's round)."""
    drop = 1.0 - ratio
    return round(num_image_tokens * (1 - drop))


def fastv_select(attention: torch.Tensor, image_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Positions FastV keeps.

    Args:
        attention: ``[heads, L]`` the last prompt token's attention probabilities at layer K-1.
        image_mask: ``[L]`` bool, image-token positions.
        ratio: retention ratio r in (0, 1].
    Returns:
        ``[L']`` sorted positions: every non-image position plus the top image tokens.
    """
    scores = attention.mean(dim=0)  # [L]
    image_positions = image_mask.nonzero().flatten()  # [L_img]
    keep_count = fastv_keep_count(int(image_positions.numel()), ratio)
    top = scores[image_positions].topk(keep_count).indices  # [keep_count]
    keep = torch.cat([(~image_mask).nonzero().flatten(), image_positions[top]])
    return keep.sort().values


@register_compressor("fastv")
class FastV(Compressor):
    """Prune image tokens inside the LLM at layer ``layer`` by last-token attention."""

    def __init__(self, ratio: float = 0.5, layer: int = 2) -> None:
        super().__init__(ratio)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"compressor.layer (FastV's K) must be an integer >= 1, got {layer!r}")
        self.llm_layer = layer

    @property
    def llm_signals(self) -> tuple[LastTokenAttention, ...]:
        return (LastTokenAttention(),)

    def select_llm_tokens(self, inp: LLMInput) -> torch.Tensor:
        if inp.attention is None:
            raise ValueError("FastV needs the LastTokenAttention signal; the pipeline did not provide it")
        return fastv_select(inp.attention[0], inp.image_mask[0], self.ratio)

    def describe(self) -> dict:
        return {**super().describe(), "layer": self.llm_layer}
