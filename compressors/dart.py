"""``dart``: DART (Wen et al., 2025), pruning by duplication against pivot tokens inside the LLM.

As the authors' code (ZichenWen1/DART, read at xqy1111111/DART@5a19452, the upstream author's last
commit: ``modeling_llama_self.py``, ``DART.forward`` and ``get_retained_image_token``):

* at the input of decoder layer ``layer`` (K = 2), from what layer K-1 produced: its keys after
  RoPE and its output hidden states passed through the model's final norm;
* pivots: the ``pivot_image_tokens`` image tokens and the ``pivot_text_tokens`` tokens after the
  image with the largest L1 norm of their keys (all heads concatenated);
* budget ``B = min(N * r, N - pivot_image_tokens)`` (the authors' LLaVA-NeXT cap) and
  ``k = int(B // (pivot_image_tokens + pivot_text_tokens))``;
* each pivot in turn takes the k remaining image tokens (image pivots excluded) least
  cosine-similar to it (normed hidden states). The pivots are visited in the order the authors'
  code visits them, that of a Python ``set`` of their positions;
* kept: the image pivots and every chosen token, ``4 + 8k`` with the defaults (text pivots are text
  and stay anyway); every text token; original position ids.

On LLaVA-NeXT the image span is the whole packed segment, as the authors' LLaVA-NeXT scripts
(there with a fixed ``B = 320``). ``ratio=1`` still drops up to 7 tokens (the cap and the floor),
so it is not the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressors.base import Compressor, DecoderKeys, DecoderOutput, LLMInput
from compressors.registry import register_compressor


def dart_token_topk(num_image_tokens: int, ratio: float, pivots_image: int, pivots_text: int) -> int:
    """Tokens each pivot takes: ``int(min(N r, N - P_img) // (P_img + P_txt))``, r = 1 - reduction."""
    budget = min(num_image_tokens * (1 - (1 - ratio)), num_image_tokens - pivots_image)
    return int(budget // (pivots_image + pivots_text))


def dart_select(keys: torch.Tensor, normed: torch.Tensor, start: int, end: int, ratio: float,
                pivots_image: int = 4, pivots_text: int = 4) -> torch.Tensor:
    """Image positions DART keeps (sorted).

    Args:
        keys: ``[L, heads * d]`` layer K-1's rotated keys, heads concatenated.
        normed: ``[L, D]`` layer K-1's output through the final norm.
        start, end: the image span ``[start, end)``; the tokens after it are the text candidates.
    """
    if keys.shape[0] - end < pivots_text:
        raise ValueError(f"dart needs {pivots_text} text tokens after the image for its pivots, got {keys.shape[0] - end}")
    num_image = end - start
    topk = dart_token_topk(num_image, ratio, pivots_image, pivots_text)
    norms = torch.norm(keys, p=1, dim=-1)  # [L]
    image_pivots = (norms[start:end].topk(pivots_image).indices + start).tolist()
    text_pivots = (norms[end:].topk(pivots_text).indices + end).tolist()
    order = list(set(image_pivots + text_pivots))  # the authors iterate this set
    pool = torch.ones(num_image, dtype=torch.bool, device=keys.device)
    pool[torch.tensor(image_pivots, device=keys.device) - start] = False
    chosen = ~pool  # image pivots are kept
    unit = F.normalize(normed, dim=-1, eps=1e-8)  # cosine similarity = dot product of unit vectors
    similarity = unit[start:end] @ unit[order].T  # [N, 8], one column per pivot in visiting order
    for column in range(len(order)):  # each pivot in turn takes k of the remaining tokens
        top = (-similarity[:, column]).masked_fill(~pool, float("-inf")).topk(topk).indices
        pool[top] = False
        chosen[top] = True
    return chosen.nonzero().flatten() + start


@register_compressor("dart")
class DART(Compressor):
    """Keep the image tokens least duplicated with respect to key-norm pivots."""

    identity_at_full_ratio = False

    def __init__(self, ratio: float = 0.2222, layer: int = 2, pivot_image_tokens: int = 4,
                 pivot_text_tokens: int = 4) -> None:
        super().__init__(ratio)
        for key, value in (("layer", layer), ("pivot_image_tokens", pivot_image_tokens),
                           ("pivot_text_tokens", pivot_text_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"compressor.{key} must be an integer >= 1, got {value!r}")
        self.llm_layer = layer
        self.pivot_image_tokens, self.pivot_text_tokens = pivot_image_tokens, pivot_text_tokens

    @property
    def llm_signals(self):
        return (DecoderKeys(), DecoderOutput(normed=True))

    def keep_count(self, num_image_tokens: int) -> int:
        """Image tokens kept: the image pivots plus k per pivot."""
        per_pivot = dart_token_topk(num_image_tokens, self.ratio, self.pivot_image_tokens, self.pivot_text_tokens)
        return self.pivot_image_tokens + (self.pivot_image_tokens + self.pivot_text_tokens) * per_pivot

    def select_llm_tokens(self, inp: LLMInput) -> torch.Tensor:
        start, end = inp.image_span()
        keys = inp.signals[DecoderKeys()][0]  # [H, L, d]
        keys = keys.transpose(0, 1).reshape(keys.shape[1], -1)  # [L, H*d]
        normed = inp.signals[DecoderOutput(normed=True)][0]  # [L, D]
        image = dart_select(keys, normed, start, end, self.ratio, self.pivot_image_tokens, self.pivot_text_tokens)
        length = inp.image_mask.shape[1]
        device = image.device
        return torch.cat([torch.arange(start, device=device), image, torch.arange(end, length, device=device)])

    def describe(self) -> dict:
        return {**super().describe(), "layer": self.llm_layer, "pivot_image_tokens": self.pivot_image_tokens,
                "pivot_text_tokens": self.pivot_text_tokens}
