"""``pdrop``: PyramidDrop (Xing et al., CVPR 2025), image tokens dropped in stages inside the LLM.

As the authors' code (Cooperx521/PyramidDrop@6444f30, ``modeling_llama_pdrop.py``: ``pdrop_forward``,
``pdrop_rank_drop``):

* stages at the input of decoder layers ``layers`` (their ``layer_list``, default 8/16/24): stage s
  keeps ``int(N * lambda**(s+1))`` of the prefill's N image tokens (their ``image_token_ratio_list``
  ``[lambda, lambda**2, lambda**3]``; the scripts use lambda = 0.5);
* score: the last instruction token (the last prompt position) attending over the current
  sequence, from layer K's own input norm and q/k projections applied to the stage input
  (recomputed, SDPA stays on), softmax, mean over heads, the image columns; top-k, original order;
* every text token is kept; after every stage the sequence is renumbered ``0..L'-1``, and decoding
  continues that numbering in every layer group (their ``position_ids -= dropped``).

``ratio`` is the paper's average-retention convention (PyramidDrop#22, #29): the mean over all
decoder layers of the image tokens a layer sees, as a fraction of N. With stages K_0 < K_1 < ... on
a D-layer decoder, lambda solves ``(K_0 + sum_s (K_{s+1} - K_s) lambda**(s+1)) / D = ratio``
(K_S = D), so 8/16/24 on 32 layers give ``(1 + l + l**2 + l**3) / 4``: lambda = 0.5 is ratio
15/32 = 0.46875, the authors' setting. Ratios below ``K_0 / D`` are unreachable and refused; the
authors suggest earlier stages such as 2/8/16 for them (PyramidDrop#29). ``ratio=1`` keeps every
token, so no stage runs.

On LLaVA-NeXT the image span is the whole packed segment (thumbnail, crops, newlines), as the
authors' LLaVA-NeXT scripts. ``score_dtype``: ``float32``, or ``model`` as the authors (q.k in the
model dtype, float32 softmax rounded back, head mean in the model dtype).
"""

from __future__ import annotations

import torch

from compressors.base import AttentionRows, Compressor, LLMInput
from compressors.fastv import SCORE_DTYPES, check_option
from compressors.registry import register_compressor


def check_layers(key: str, layers, minimum: int = 1) -> tuple[int, ...]:
    """A non-empty, strictly increasing list of decoder layers >= ``minimum``."""
    values = tuple(layers) if isinstance(layers, (list, tuple)) else None
    if (not values or any(isinstance(k, bool) or not isinstance(k, int) or k < minimum for k in values)
            or list(values) != sorted(set(values))):
        raise ValueError(f"compressor.{key} must be a non-empty, strictly increasing list of decoder layers "
                         f">= {minimum}, got {layers!r}")
    return values


def mean_retention(lam: float, layers: tuple[int, ...], num_layers: int) -> float:
    """Mean over the ``num_layers`` decoder layers of the retained image fraction, lambda per stage."""
    bounds = (*layers, num_layers)
    return (layers[0] + sum((bounds[s + 1] - bounds[s]) * lam ** (s + 1) for s in range(len(layers)))) / num_layers


def pdrop_lambda(ratio: float, layers: tuple[int, ...], num_layers: int) -> float:
    """The lambda whose layer-mean retention is ``ratio`` (bisection; rounded to 9 decimals so exact
    settings give exact counts: 8/16/24 of 32 at 15/32 -> 0.5)."""
    floor = layers[0] / num_layers
    if ratio < floor - 1e-12:
        raise ValueError(
            f"pdrop: ratio {ratio} is below the lowest layer-mean retention of stages {list(layers)} on "
            f"{num_layers} layers ({layers[0]}/{num_layers} = {floor:.4f}, every image token dropped at layer "
            f"{layers[0]}); set compressor.layers to earlier stages, e.g. [2, 8, 16] (PyramidDrop#29)")
    low, high = 0.0, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        if mean_retention(mid, layers, num_layers) < ratio:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 9)


def pdrop_keep_counts(num_image_tokens: int, lam: float, stages: int) -> list[int]:
    """Image tokens kept after each stage: ``int(N * lambda**(s+1))`` (the authors' floor)."""
    return [int(num_image_tokens * lam ** (s + 1)) for s in range(stages)]


def pdrop_select(attention: torch.Tensor, image_mask: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Positions one stage keeps.

    Args:
        attention: ``[heads, L]`` the last position's attention probabilities at layer K.
        image_mask: ``[L]`` bool, the current image tokens (one contiguous span).
        keep_count: image tokens to keep.
    Returns:
        ``[L']`` sorted positions: every text position plus the top image tokens.
    """
    scores = attention.mean(dim=0)  # [L] head mean (in the attention's dtype, as the authors)
    image_positions = image_mask.nonzero().flatten()
    top = scores[image_positions].topk(keep_count).indices
    return torch.cat([(~image_mask).nonzero().flatten(), image_positions[top]]).sort().values


@register_compressor("pdrop")
class PyramidDrop(Compressor):
    """Multi-stage pruning with a geometric schedule, scored by the last token at each stage layer."""

    llm_positions = "contiguous"
    llm_layer_key = "layers"  # the setting named by the depth check

    def __init__(self, ratio: float = 0.46875, layers: tuple[int, ...] = (8, 16, 24),
                 score_dtype: str = "float32") -> None:
        super().__init__(ratio)
        self.layers = check_layers("layers", layers)
        check_option("score_dtype", score_dtype, SCORE_DTYPES)
        self.score_dtype = score_dtype
        self.llm_layers = () if self.ratio == 1.0 else self.layers  # ratio 1 keeps every token

    @property
    def llm_signals(self) -> tuple[AttentionRows, ...]:
        return (AttentionRows(layer="stage", queries="last", dtype=self.score_dtype),)

    def keep_counts(self, num_image_tokens: int, num_layers: int) -> list[int]:
        """Image tokens kept after each stage on a ``num_layers``-layer decoder."""
        lam = pdrop_lambda(self.ratio, self.layers, num_layers)
        return pdrop_keep_counts(num_image_tokens, lam, len(self.layers))

    def select_llm_tokens(self, inp: LLMInput) -> torch.Tensor:
        if inp.num_image_tokens == 0:  # an earlier stage kept none (lambda = 0)
            return torch.arange(inp.image_mask.shape[1], device=inp.image_mask.device)
        inp.image_span()  # one contiguous image span
        counts = inp.state.get("pdrop_counts")
        if counts is None:
            counts = inp.state["pdrop_counts"] = self.keep_counts(inp.prefill_image_tokens, inp.num_layers)
        attention = inp.signals[self.llm_signals[0]][0, :, -1]  # [H, L]
        return pdrop_select(attention, inp.image_mask[0], counts[inp.stage])

    def describe(self) -> dict:
        return {**super().describe(), "layers": list(self.layers), "score_dtype": self.score_dtype}
