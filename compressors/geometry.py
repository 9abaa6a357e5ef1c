"""AnyRes geometry of one LLaVA-NeXT image: crop grid, padded canvas, unpadded region, token ids.

Every vision-stage compressor works on the same picture of an image, so it lives here once:

* tile 0 is the thumbnail (the whole image squashed to one tile), tiles 1..n are the crops of the
  padded canvas in row-major order; each tile is a ``side x side`` token grid (24 x 24 for 336 px /
  patch 14);
* the crops tile a canvas of ``rows*side x cols*side`` tokens, of which only a centred box holds
  the image (the rest is padding); vanilla LLaVA-NeXT keeps that box and ends each of its rows
  with one ``image_newline`` token;
* a *source id* names one input token: ``tile * side**2 + y * side + x``; ``-1`` marks a newline;
  the ids after the patch tokens, ``num_tiles * side**2 + tile``, name each tile's [CLS] token
  (which VisionZip passes to the LLM).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

UnpadRounding = Literal["hf", "llava"]
UNPAD_ROUNDINGS: tuple[str, ...] = ("hf", "llava")
NEWLINE_SOURCE = -1


@dataclass(frozen=True)
class Box:
    """Half-open token box ``[top, bottom) x [left, right)`` on the padded canvas."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def height(self) -> int:
        return max(self.bottom - self.top, 0)

    @property
    def width(self) -> int:
        return max(self.right - self.left, 0)


@dataclass(frozen=True)
class AnyResLayout:
    """Crop grid and original size of one image.

    Args:
        rows, cols: crop grid of the padded canvas (rows x cols crops).
        side: tokens per tile side (24 for CLIP-L/14 at 336 px).
        image_hw: original image (height, width) in pixels, as in transformers' ``image_sizes``.
    """

    rows: int
    cols: int
    side: int
    image_hw: tuple[int, int]

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or self.side < 1:
            raise ValueError(f"AnyResLayout needs rows, cols, side >= 1, got {self.rows}, {self.cols}, {self.side}")
        if min(self.image_hw) < 1:
            raise ValueError(f"image_hw must be positive, got {self.image_hw}")

    @property
    def num_crops(self) -> int:
        return self.rows * self.cols

    @property
    def num_tiles(self) -> int:
        return 1 + self.num_crops

    @property
    def tokens_per_tile(self) -> int:
        return self.side * self.side

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return self.rows * self.side, self.cols * self.side

    def cls_source_id(self, tile: int | torch.Tensor) -> int | torch.Tensor:
        """Source id of a tile's [CLS] token: after every patch id, ``num_tiles * side**2 + tile``."""
        return self.num_tiles * self.tokens_per_tile + tile

    def with_side(self, side: int) -> "AnyResLayout":
        """The same grid and image on tiles of ``side x side`` tokens (e.g. after pooling)."""
        return replace(self, side=side)

    def valid_box(self, rounding: UnpadRounding = "hf") -> Box:
        """The canvas box that holds the image (LLaVA-NeXT's ``unpad_image``).

        ``rounding="hf"`` is transformers' rule (``int(round(x, 7))``); ``"llava"`` is the original
        LLaVA / GlobalCom2 rule (plain ``int()`` truncation). They differ by one row or column on
        some sizes. Float order (divide, then multiply) follows both sources exactly.
        """
        if rounding not in UNPAD_ROUNDINGS:
            raise ValueError(f"unknown unpad rounding {rounding!r}; allowed: {', '.join(UNPAD_ROUNDINGS)}")
        height, width = self.image_hw
        canvas_h, canvas_w = self.canvas_hw
        if width / height > canvas_w / canvas_h:
            scale = canvas_w / width
            new_h = int(round(height * scale, 7)) if rounding == "hf" else int(height * scale)
            pad = (canvas_h - new_h) // 2
            return Box(pad, canvas_h - pad, 0, canvas_w)
        scale = canvas_h / height
        new_w = int(round(width * scale, 7)) if rounding == "hf" else int(width * scale)
        pad = (canvas_w - new_w) // 2
        return Box(0, canvas_h, pad, canvas_w - pad)

    def canvas_source_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Source id of every canvas token. Returns ``[rows*side, cols*side]`` long."""
        canvas_h, canvas_w = self.canvas_hw
        ys = torch.arange(canvas_h, device=device)[:, None]  # [Hc, 1]
        xs = torch.arange(canvas_w, device=device)[None, :]  # [1, Wc]
        crop = (ys // self.side) * self.cols + xs // self.side  # [Hc, Wc]
        patch = (ys % self.side) * self.side + xs % self.side  # [Hc, Wc]
        return (1 + crop) * self.tokens_per_tile + patch

    def tile_valid_mask(self, rounding: UnpadRounding = "hf", device=None) -> torch.Tensor:
        """Which tokens of each tile lie in the image (not padding).

        Returns ``[num_tiles, side**2]`` bool; the thumbnail row is all True.
        """
        box = self.valid_box(rounding)
        canvas_h, canvas_w = self.canvas_hw
        ys = torch.arange(canvas_h, device=device)[:, None]
        xs = torch.arange(canvas_w, device=device)[None, :]
        inside = (ys >= box.top) & (ys < box.bottom) & (xs >= box.left) & (xs < box.right)  # [Hc, Wc]
        crops = inside.view(self.rows, self.side, self.cols, self.side).permute(0, 2, 1, 3)  # [r, c, s, s]
        crops = crops.reshape(self.num_crops, self.tokens_per_tile)
        thumb = torch.ones(1, self.tokens_per_tile, dtype=torch.bool, device=crops.device)
        return torch.cat([thumb, crops])

    def vanilla_token_count(self) -> int:
        """Tokens vanilla LLaVA-NeXT splices for this image: thumbnail + unpadded rows + newlines."""
        box = self.valid_box("hf")
        return self.tokens_per_tile + box.height * (box.width + 1)


def layout_for_image(
    image_hw: tuple[int, int],
    grid_pinpoints: list[list[int]],
    tile_px: int = 336,
    patch_px: int = 14,
) -> AnyResLayout:
    """The layout transformers' LLaVA-NeXT processor gives an image of ``image_hw`` (H, W).

    Uses transformers' own ``select_best_resolution`` so the grid matches the crops the processor
    actually cut (on canvas ties transformers prefers a wide canvas where LLaVA prefers a tall one).
    """
    from transformers.image_processing_utils import select_best_resolution

    canvas_h, canvas_w = select_best_resolution(tuple(int(v) for v in image_hw), grid_pinpoints)
    return AnyResLayout(
        rows=canvas_h // tile_px,
        cols=canvas_w // tile_px,
        side=tile_px // patch_px,
        image_hw=(int(image_hw[0]), int(image_hw[1])),
    )
