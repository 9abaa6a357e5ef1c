"""``downsample``: the image itself at a lower resolution, VTC-Bench's baseline on LLaVA-NeXT.

VTC-Bench (Liao et al., 2025) found that plainly downsampling the image beats many token
compressors; its code resizes the image by an integer factor ``k`` (bicubic) before the processor of
a native-resolution model (Qwen2-VL), which then emits about ``1 / k**2`` of the tokens.

LLaVA-NeXT is not native-resolution: its processor scales any image onto a canvas of 336 px tiles
and always encodes a 576-token thumbnail, so a smaller image alone still costs at least 1,176
tokens (a 336 x 336 image gets the 1 x 2 grid). Here the resolution drop reaches the tokens:

1. ``s = max(1, round(24 sqrt(ratio)))`` tokens per tile side (as ``pooling``'s pooled side);
2. the image is resized by ``s / 24`` (bicubic, ``round`` of each side, at least 1 px);
3. it is processed on tiles of ``14 s`` pixels, the AnyRes pinpoints scaled by ``s / 24`` (so the
   grid and the unpadding keep their proportions), and the vision tower encodes those tiles with
   interpolated position embeddings (``models.vision.encode_vision``);
4. the tiles are packed as vanilla LLaVA-NeXT packs them: ``s**2`` thumbnail tokens, then each
   unpadded canvas row and its ``image_newline``.

Every view, the thumbnail included, carries about ``ratio`` of its tokens:
``s**2 + H'_u (W'_u + 1)`` in all, ``(H'_u, W'_u)`` the unpadded box of the resized image on the
scaled canvas. At ``ratio = 1``, ``s = 24`` and nothing is resized: the output is vanilla's.

No authors' code exists for LLaVA-NeXT; the tests check the definition (sizes, grid, counts, and
that the encoded tiles are the tower's output on the resized image). Position-embedding
interpolation puts CLIP outside its training resolution: that is what downsampling a fixed-size
ViT means, and part of what this baseline measures. Budget: global (the whole image is resized),
newlines counted (they are part of the smaller image's vanilla packing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PIL import Image

from compressors.base import Compressor
from compressors.budget import Budget
from compressors.pooling import pooled_side
from compressors.registry import register_compressor

BUDGETS = (Budget(scope="global", count_newlines=True),)


def downsampled_size(width: int, height: int, side: int, model_side: int) -> tuple[int, int]:
    """``(W', H')``: each side scaled by ``side / model_side``, rounded, at least 1 px."""
    scale = side / model_side
    return max(1, round(width * scale)), max(1, round(height * scale))


@register_compressor("downsample")
class Downsample(Compressor):
    """The image at ``s / 24`` of its resolution (``s = round(24 sqrt(ratio))``), on ``14 s``-px tiles.

    Args:
        ratio: about the share of tokens each view keeps (default 0.25: half the resolution).
        budget: must be ``{scope: global, count_newlines: true}``.
    """

    def __init__(self, ratio: float = 0.25, budget: Mapping[str, Any] | None = BUDGETS[0].as_default()) -> None:
        super().__init__(ratio)
        self.budget = Budget.parse(budget, BUDGETS)

    def transform_image(self, image: Image.Image, side: int) -> tuple[Image.Image, int]:
        new_side = pooled_side(side, self.ratio)
        if new_side == side:
            return image, side
        return image.resize(downsampled_size(image.width, image.height, new_side, side), Image.BICUBIC), new_side
