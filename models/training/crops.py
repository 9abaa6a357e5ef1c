"""Stage 2a: conversations about single crops, from a few background tokens up to the whole crop.

Why: a decoder trained from scratch on full AnyRes sequences (~3k image tokens, of which a few
dozen show objects) stays at the answer prior for hundreds of steps: every image token looks alike
to it, so no gradient tells it where to look. A ``hires_detail`` crop is a complete scene of its
own (objects sit in 56 px cells that tile the 336 px crop, so none straddles two crops), and its
questions are answerable from its 576 tokens alone. Stage 2a therefore trains on one crop's object
patches plus ``distractors`` random background patches, the count growing geometrically to the
whole crop (a distractor curriculum). Stage 2b does the same on whole images, with every token at
its own position id (``sparse_image_keep``), until it sees them exactly as inference feeds them.
The object patches come from stage 1's labels (``models.training.labels``). A share of the crops
first receive the image's other digit boxes (``paste_boxes``), so a digit question has another box
to tell apart more often than a crop alone offers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from benchmarks.hires_detail import CELL_PX, DigitBox, Scene, all_questions
from compressors.geometry import AnyResLayout
from compressors.packing import spatial_source_order
from models.training.conversation import Conversation, build_conversation, training_turns


def crop_scene(scene: Scene, row: int, col: int, tile_px: int = 336) -> Scene:
    """The objects of crop ``(row, col)`` as a one-crop scene (for its questions; not for drawing)."""
    left, top = col * tile_px, row * tile_px

    def inside(box) -> bool:
        return left <= box[0] and box[2] <= left + tile_px and top <= box[1] and box[3] <= top + tile_px

    return Scene(grid="1x1", image_hw=(tile_px, tile_px), shapes=tuple(s for s in scene.shapes if inside(s.box)),
                 boxes=tuple(b for b in scene.boxes if inside(b.box)), tint=scene.tint, texture_seed=0)


def with_random_extra(keep: torch.Tensor, candidates: torch.Tensor, count: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``keep`` (bool) plus ``count`` uniformly drawn positions where ``candidates`` (bool) is true."""
    pool = candidates.nonzero().flatten()
    keep = keep.clone()
    keep[pool[torch.randperm(len(pool), generator=generator)[:count]]] = True
    return keep


def distractors_at(step: int, steps: int, start: int, ramp: float, total: int) -> int:
    """Background patches shown at ``step``: ``start`` growing geometrically to ``total`` over the first
    ``ramp`` of the ``steps`` (then every patch)."""
    reach = max(ramp * steps, 1.0)
    fraction = min(step / reach, 1.0)
    return min(total, int(round(start * (total / start) ** fraction)))


@dataclass(frozen=True)
class CropExample:
    """One crop conversation: ``view`` indexes the image's tower features ``[T, P, C]``; ``keep``
    ``[P]`` bool selects its patches (raster order kept); the conversation has ``keep.sum()`` image tokens.
    ``patches`` ``[P]`` long is where each patch's token comes from among the image's ``T * P`` (the
    view's own patches, except in cells a box was pasted into): the tokens are
    ``features.flatten(0, 1)[patches[keep]]``."""

    image: int
    view: int
    keep: torch.Tensor
    conversation: Conversation
    patches: torch.Tensor


def paste_boxes(rng: random.Random, scene: Scene, crop: int, cols: int, objects: torch.Tensor, tile: int,
                patch: int) -> tuple[Scene, torch.Tensor, torch.Tensor]:
    """Crop ``crop`` with the digit boxes of the image's other crops moved into its empty cells.

    Why: a crop holds two digit boxes in one case of seven, so crop training rarely asks for "the digit
    in the red box" where another box could answer, and the decoder learned to read whichever digit it
    found (whole images: right for one box, at chance among two or three). A box is alone in its cell
    and the tower's features are local (its glyph's patches do not even know the frame's colour), so a
    cell's tokens can move to another cell of the same grid.

    Args:
        objects: ``[V, P]`` the image's object patches (``models.training.symbolic.PatchSymbols.objects``).
    Returns:
        the crop's scene (moved boxes at their new image-pixel boxes, as ``crop_scene`` keeps image
        coordinates), each patch's source among the image's ``V * P`` tokens ``[P]`` (long) and the
        crop's object patches ``[P]`` (bool).
    """
    side, cells, per_cell = tile // patch, tile // CELL_PX, CELL_PX // patch
    view = 1 + crop
    left, top = (crop % cols) * tile, (crop // cols) * tile
    local = crop_scene(scene, crop // cols, crop % cols, tile_px=tile)
    patches = view * side * side + torch.arange(side * side)  # [P]
    shown = objects[view].clone()  # [P]

    def by_cell(values: torch.Tensor) -> torch.Tensor:  # [P] -> [cells, k, cells, k] (a view: writes go through)
        return values.view(cells, per_cell, cells, per_cell)

    free = (~by_cell(shown).any(dim=(1, 3))).flatten().nonzero().flatten().tolist()  # empty cells, row-major
    moved = []
    for box in scene.boxes:
        if box in local.boxes or not free:
            continue
        l, t, r, b = box.box
        src_view = 1 + (t // tile) * cols + l // tile
        src_row, src_col = (t % tile) // CELL_PX, (l % tile) // CELL_PX
        dst_row, dst_col = divmod(free.pop(rng.randrange(len(free))), cells)
        source = src_view * side * side + torch.arange(side * side)  # [P] the source view's token ids
        by_cell(patches)[dst_row, :, dst_col, :] = by_cell(source)[src_row, :, src_col, :]
        by_cell(shown)[dst_row, :, dst_col, :] = by_cell(objects[src_view])[src_row, :, src_col, :]
        dx = left + dst_col * CELL_PX - l // CELL_PX * CELL_PX
        dy = top + dst_row * CELL_PX - t // CELL_PX * CELL_PX
        moved.append(DigitBox(box.digit, box.color, (l + dx, t + dy, r + dx, b + dy)))
    return replace(local, boxes=local.boxes + tuple(moved)), patches, shown


def crop_example(tokenizer, config, rng: random.Random, image: int, scene: Scene, objects: torch.Tensor,
                 distractors: int, max_turns: int, independent_turns: bool = False,
                 paste_boxes_share: float = 0.0) -> CropExample:
    """A random crop of ``scene`` (train image ``image``), its object patches plus ``distractors`` random
    background ones, and a conversation about that crop's objects; in a ``paste_boxes_share`` of the
    examples the image's other digit boxes are moved into the crop first (``paste_boxes``).

    Args:
        objects: ``[V, P]``, ``models.training.symbolic.PatchSymbols.objects``.
    """
    vision = config.vision_config
    tile = vision.image_size
    rows, cols = scene.image_hw[0] // tile, scene.image_hw[1] // tile
    crop = rng.randrange(rows * cols)
    view = 1 + crop  # view 0 is the thumbnail
    if paste_boxes_share and rng.random() < paste_boxes_share:
        local, patches, shown = paste_boxes(rng, scene, crop, cols, objects, tile, vision.patch_size)
    else:
        local, shown = crop_scene(scene, *divmod(crop, cols), tile_px=tile), objects[view]  # [P]
        patches = view * shown.numel() + torch.arange(shown.numel())
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    keep = with_random_extra(shown, ~shown, distractors, generator)

    questions = all_questions(rng, local)
    primary = rng.choice([q for qs in questions.values() for q in qs])  # count questions always exist
    turns = training_turns(rng, primary, questions, max_turns)
    conversation = build_conversation(tokenizer, turns, config.image_token_id, int(keep.sum()),
                                      independent=independent_turns)
    return CropExample(image, view, keep, conversation, patches)


def sparse_image_keep(layout: AnyResLayout, objects: torch.Tensor, distractors: int,
                      generator: torch.Generator) -> torch.Tensor:
    """Stage 2b's sparse image segment: every token of an object patch (thumbnail and crops), every
    newline and ``distractors`` random background tokens. ``[N_img]`` bool in vanilla splice order.

    Args:
        objects: ``[V, P]``, ``models.training.symbolic.PatchSymbols.objects``.
    """
    order = spatial_source_order(layout)  # [N_img] source id (view * P + patch), -1 = newline
    is_patch = order >= 0
    shown = objects.flatten()[order.clamp(min=0)] & is_patch  # [N_img]
    return with_random_extra(shown | ~is_patch, is_patch & ~shown, distractors, generator)
