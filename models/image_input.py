"""What the vision tower is shown of one image: the fixed-size input mode and tiles of another size.

* **Fixed size** (``model.image_size``): every image is resized to ``size x size`` before anything
  else. At 672 every image gets LLaVA-NeXT's 2x2 grid, 2,928 vanilla tokens (2,880 without the 48
  newlines): the base the papers count their budgets on (FasterVLM evaluates this way, FasterVLM#8).
  Native AnyRes (``image_size=None``) stays the default.
* **Other tile sizes** (``Compressor.transform_image``, used by ``downsample``): tiles of ``side``
  tokens (``side * patch`` pixels) instead of the model's 24. The AnyRes pinpoints are scaled by
  ``side / model_side``, so the grid choice and the unpadding keep their proportions, and the
  vision tower encodes the smaller tiles with interpolated position embeddings
  (``models.vision.encode_vision``).
"""

from __future__ import annotations

import torch
from PIL import Image


def check_image_size(size: object) -> int | None:
    """``model.image_size``: None (native AnyRes) or a positive number of pixels."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"model.image_size must be null (native AnyRes) or a positive integer such as 672; "
                         f"got {size!r}")
    return size


def fixed_size(image: Image.Image, size: int | None) -> Image.Image:
    """``image`` resized to ``size x size`` (bicubic, as the processor resizes); unchanged if None or already so."""
    if size is None or image.size == (size, size):
        return image
    return image.resize((size, size), Image.BICUBIC)


def scaled_pinpoints(pinpoints: list[list[int]], side: int, model_side: int) -> list[list[int]]:
    """Canvas sizes ``(H, W)`` in pixels for tiles of ``side`` tokens (``model_side`` = the model's)."""
    return [[h * side // model_side, w * side // model_side] for h, w in pinpoints]


def process_scaled(processor, image: Image.Image, prompt: str, side: int, patch_px: int) -> dict[str, torch.Tensor]:
    """The processor's outputs for tiles of ``side`` tokens: ``input_ids`` with ONE ``<image>``
    placeholder (the pipeline splices the real count), ``pixel_values`` ``[1, T, 3, s, s]`` with
    ``s = side * patch_px``, and ``image_sizes`` ``[1, 2]`` (H, W)."""
    image_processor = processor.image_processor
    tile_px = side * patch_px
    model_side = image_processor.crop_size["height"] // patch_px
    pixels = image_processor(
        image, size={"shortest_edge": tile_px}, crop_size={"height": tile_px, "width": tile_px},
        image_grid_pinpoints=scaled_pinpoints(image_processor.image_grid_pinpoints, side, model_side),
        return_tensors="pt",
    )
    input_ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return {"input_ids": input_ids, "pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
