"""Stage 2's warm-up on symbolic image tokens, and the projector alignment that links it to real features.

Why: our decoder starts from scratch, where LLaVA's starts from Vicuna, a language model that
already finds a named thing in its context and reads what is said about it. Learning that look-up
on projected tower features is slow: the decoder must discover what the features mean and where to
look at once, and on single crops it reached about 65% after 2,500 steps. On *symbolic* image
tokens it learns the same look-up within a few hundred short steps: each image token is the sum of
the word embeddings of what its patch shows (kind, colour, digit; ``<unk>`` for background), the
per-patch labels stage 1 trains the tower on. The projector is then aligned to map tower
features onto those vectors (LLaVA's stage 1 likewise aligns its projector to the language model's
word space), and the decoder is fine-tuned on the real features, which no longer look foreign.

Shapes: ``V`` views (thumbnail, then crops), ``P`` patches per view, ``D`` the decoder width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from benchmarks.hires_detail import DIGITS
from models.training.labels import COLORS, KINDS, ViewLabels


@dataclass(frozen=True)
class SymbolIds:
    """Token ids that spell a patch's labels: per ``KINDS`` entry (background: ``<unk>``), per
    ``COLORS`` entry and per digit."""

    kind: torch.Tensor  # [len(KINDS)]
    color: torch.Tensor  # [len(COLORS)]
    digit: torch.Tensor  # [len(DIGITS)]

    @classmethod
    def of(cls, tokenizer) -> "SymbolIds":
        """A kind is the word a question names it with ("circle?"), a colour and a digit their answer words."""

        def single(text: str) -> int:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"symbolic tokens need {text!r} to be one token of the task tokenizer, got {ids}")
            return ids[0]

        kinds = [tokenizer.unk_token_id, *(single(f" {kind}?") for kind in KINDS[1:])]
        return cls(torch.tensor(kinds), torch.tensor([single(f" {c}") for c in COLORS]),
                   torch.tensor([single(f" {d}") for d in DIGITS]))


@dataclass(frozen=True)
class PatchSymbols:
    """What each patch of each view belongs to, ``[V, P]`` each: ``kind`` (``KINDS`` index, 0 = background),
    ``color`` (``COLORS`` index, -1 on background) and ``digit`` (-1 off digit boxes).

    Unlike stage 1's per-patch digit target (the glyph's own patches only), every patch of a digit box,
    frame included, carries the box's digit: a token describes the object it belongs to, as a
    shape's patches all carry its colour. With the digit on the glyph's 4 of a box's ~16 patches
    only, a look-up of "the blue box" read the digit at a quarter of the strength of a colour, and the
    symbolic warm-up learned colour, presence and count questions but not digits (19% on crops after
    800 steps, 75% with the digit on every patch of the box).
    """

    kind: torch.Tensor
    color: torch.Tensor
    digit: torch.Tensor

    @classmethod
    def of(cls, labels: ViewLabels) -> "PatchSymbols":
        objects = labels.objects  # shapes first, then digit boxes
        shapes = len(objects.kind) - len(objects.digit)
        digit = torch.cat([torch.full((shapes,), -1, dtype=torch.long), objects.digit])  # [O]
        index = labels.patch_object  # [V, P], -1 on background

        def gather(values: torch.Tensor, empty: int) -> torch.Tensor:
            fill = torch.full_like(index, empty)
            return fill if values.numel() == 0 else torch.where(index < 0, fill, values[index.clamp(min=0)])

        return cls(gather(objects.kind, 0), gather(objects.color, -1), gather(digit, -1))

    @property
    def objects(self) -> torch.Tensor:
        """``[V, P]`` bool: the patches that show an object (the object tokens the curricula always show)."""
        return self.kind > 0


def symbolic_views(embed: torch.nn.Embedding, ids: SymbolIds, symbols: PatchSymbols) -> torch.Tensor:
    """The symbolic image tokens of one image's views, ``[V, P, D]``: per patch the embedding of its kind
    word, plus its colour word where it has a colour, plus its digit word where it belongs to a digit box."""
    device = embed.weight.device
    kind, color, digit = (getattr(symbols, name).to(device) for name in ("kind", "color", "digit"))  # [V, P]
    tokens = embed(ids.kind.to(device)[kind])  # [V, P, D]
    tokens = tokens + (color >= 0)[..., None] * embed(ids.color.to(device)[color.clamp(min=0)])
    return tokens + (digit >= 0)[..., None] * embed(ids.digit.to(device)[digit.clamp(min=0)])


def alignment_loss(projected: torch.Tensor, symbolic: torch.Tensor) -> torch.Tensor:
    """Mean squared error of projected features against (detached) symbolic tokens, relative to the
    symbolic tokens' mean square, so 1.0 is as far as predicting zeros. Any matching shapes ``[..., D]``."""
    target = symbolic.detach()
    return F.mse_loss(projected, target) / target.pow(2).mean().clamp(min=1e-12)
