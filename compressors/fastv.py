"""``fastv``: FastV (Chen et al., 2024), in-LLM pruning of image tokens at decoder layer K.

As the authors' KV-cache implementation (pkunlp-icler/FastV, llava-hf fork, ``fastv_forward``):

* score: layer K-1's attention probabilities (after softmax), averaged over heads, from the LAST
  token to every image token;
* keep the top ``round(L * (1 - R))`` of the L image tokens, where the authors' R is the dropped
  fraction; here ``R = 1 - ratio`` and the arithmetic is the authors', so float rounding matches;
* every text token is kept; kept positions are re-sorted (original order) and keep their
  original position ids; layers >= K see only them.

``decode`` picks between the authors' three decoding behaviours (``../shared/notes/fastv_authors.md``):
``prefill_once`` (default; the llava-hf KV-cache path: selected once at prefill, pruned caches),
``reselect_recompute`` (no KV cache: every step re-runs the sequence and re-selects by the newest
token) and ``reselect_mask`` (every token kept; every forward re-selects by the current token and
masks the other image tokens as keys from layer K on: the path of the paper's K/R ablation).
``score_dtype``: ``float32`` scores in float32; ``model`` as the authors (q.k and the rounded softmax
in the model dtype, head mean in that dtype), which in fp16/bf16 moves a few tokens at the cut-off.

On LLaVA-NeXT the image span is the whole packed segment: thumbnail, crops and ``image_newline``
tokens compete together (the authors' single-image span; their code has no AnyRes handling).
The attention row is computed from layer K-1's own q/k projections; no layer runs eager.
"""

from __future__ import annotations

import torch

from compressors.base import AttentionRows, Compressor, LLMInput
from compressors.registry import register_compressor

DECODE_OPTIONS = {"prefill_once": "prefill_once", "reselect_recompute": "recompute", "reselect_mask": "mask"}
SCORE_DTYPES = ("float32", "model")


def fastv_keep_count(num_image_tokens: int, ratio: float) -> int:
    """Image tokens FastV keeps: ``round(L * (1 - R))`` with ``R = 1 - ratio`` (Python's round)."""
    drop = 1.0 - ratio
    return round(num_image_tokens * (1 - drop))


def fastv_select(attention: torch.Tensor, image_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Positions FastV keeps.

    Args:
        attention: ``[heads, L]`` the last token's attention probabilities at layer K-1.
        image_mask: ``[L]`` bool, image-token positions.
        ratio: retention ratio r in (0, 1].
    Returns:
        ``[L']`` sorted positions: every non-image position plus the top image tokens.
    """
    scores = attention.mean(dim=0)  # [L], in the attention's dtype (the authors': the model's)
    image_positions = image_mask.nonzero().flatten()  # [L_img]
    keep_count = fastv_keep_count(int(image_positions.numel()), ratio)
    top = scores[image_positions].topk(keep_count).indices  # [keep_count]
    keep = torch.cat([(~image_mask).nonzero().flatten(), image_positions[top]])
    return keep.sort().values


def check_option(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"compressor.{key} must be one of {', '.join(allowed)}, got {value!r}")


@register_compressor("fastv")
class FastV(Compressor):
    """Prune image tokens inside the LLM at layer ``layer`` by last-token attention."""

    def __init__(self, ratio: float = 0.5, layer: int = 2, decode: str = "prefill_once",
                 score_dtype: str = "float32") -> None:
        super().__init__(ratio)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"compressor.layer (FastV's K) must be an integer >= 1, got {layer!r}")
        check_option("decode", decode, DECODE_OPTIONS)
        check_option("score_dtype", score_dtype, SCORE_DTYPES)
        self.llm_layer = layer
        self.decode = decode
        self.llm_decode = DECODE_OPTIONS[decode]
        self.score_dtype = score_dtype

    @property
    def llm_signals(self) -> tuple[AttentionRows, ...]:
        return (AttentionRows(layer="previous", queries="last", dtype=self.score_dtype),)

    def select_llm_tokens(self, inp: LLMInput) -> torch.Tensor:
        attention = inp.signals.get(self.llm_signals[0])
        if attention is None:
            raise ValueError("FastV needs the AttentionRows signal; the pipeline did not provide it")
        return fastv_select(attention[0, :, -1], inp.image_mask[0], self.ratio)

    def describe(self) -> dict:
        return {**super().describe(), "layer": self.llm_layer, "decode": self.decode, "score_dtype": self.score_dtype}
