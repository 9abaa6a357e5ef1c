"""Stage-1 targets: which object classes each 336 px view shows, overall and per patch.

A view is one tile the processor cuts: the thumbnail (the whole image squeezed to 336 x 336) or a
crop. ``hires_detail`` images are exactly their canvas, so crop ``(r, c)`` is the image's pixels
``[336 r, 336 (r + 1)) x [336 c, 336 (c + 1))`` and object boxes map to views by a scale and an
offset; ``tests/test_train_tiny.py`` checks that against the processor's own tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.hires_detail import BOX_COLORS, DIGITS, SHAPE_COLORS, Scene, digit_glyph_box
from benchmarks.synthetic import SHAPES
from compressors.geometry import layout_for_image

PRESENCE_CLASSES: tuple[str, ...] = (
    *(f"{color} {kind}" for kind in SHAPES for color in SHAPE_COLORS),
    *(f"digit {digit}" for digit in DIGITS),
    *(f"{color} box" for color in BOX_COLORS),
)
# What a patch shows, factorised so every class has many examples: its kind (background, a shape
# kind or a digit box), its colour (a shape's fill or a box's frame) and, on a box, the digit.
KINDS: tuple[str, ...] = ("background", *SHAPES, "box")
COLORS: tuple[str, ...] = SHAPE_COLORS  # box frame colours are a subset
MIN_VISIBLE = 0.5  # a view shows an object when this fraction of its box lies inside the view
MIN_COVER = 0.2  # a patch shows an object holding this fraction of the patch or of the object


@dataclass(frozen=True)
class ObjectTargets:
    """Per object (shapes, then digit boxes): pixel box ``[O, 4]`` (left, top, right, bottom), presence
    classes ``[O, K]`` bool, ``KINDS`` and ``COLORS`` indices ``[O]``; per digit box, its glyph's
    pixel box ``[G, 4]`` and digit ``[G]``."""

    boxes: torch.Tensor
    presence: torch.Tensor
    kind: torch.Tensor
    color: torch.Tensor
    glyph_boxes: torch.Tensor
    digit: torch.Tensor


def object_targets(scene: Scene) -> ObjectTargets:
    """Targets of every object of a scene."""
    objects = [(s.box, s.kind, s.color) for s in scene.shapes] + [(b.box, "box", b.color) for b in scene.boxes]
    presence = torch.zeros(len(objects), len(PRESENCE_CLASSES), dtype=torch.bool)
    for i, (_, kind, color) in enumerate(objects):
        presence[i, PRESENCE_CLASSES.index(f"{color} {kind}")] = True
    for i, box in enumerate(scene.boxes, start=len(scene.shapes)):
        presence[i, PRESENCE_CLASSES.index(f"digit {box.digit}")] = True
    return ObjectTargets(
        boxes=torch.tensor([o[0] for o in objects], dtype=torch.float32).reshape(-1, 4),
        presence=presence,
        kind=torch.tensor([KINDS.index(o[1]) for o in objects], dtype=torch.long),
        color=torch.tensor([COLORS.index(o[2]) for o in objects], dtype=torch.long),
        glyph_boxes=torch.tensor([digit_glyph_box(b) for b in scene.boxes], dtype=torch.float32).reshape(-1, 4),
        digit=torch.tensor([DIGITS.index(b.digit) for b in scene.boxes], dtype=torch.long),
    )


def view_transforms(scene: Scene, grid_pinpoints, tile_px: int = 336) -> torch.Tensor:
    """Per view (thumbnail, then crops row-major) ``(sx, sy, ox, oy)``: view = pixel * s - o. ``[V, 4]``."""
    layout = layout_for_image(scene.image_hw, grid_pinpoints, tile_px)
    height, width = scene.image_hw
    if (layout.rows * tile_px, layout.cols * tile_px) != (height, width):
        raise ValueError(f"image {height}x{width} is not its canvas {layout.rows * tile_px}x{layout.cols * tile_px}")
    crops = [(1.0, 1.0, c * tile_px, r * tile_px) for r in range(layout.rows) for c in range(layout.cols)]
    return torch.tensor([(tile_px / width, tile_px / height, 0.0, 0.0), *crops], dtype=torch.float32)


@dataclass(frozen=True)
class ViewLabels:
    """What each view shows. ``presence`` ``[V, K]`` bool; per patch ``[V, P]``: ``patch_object`` (the
    object covering most of the patch, -1: none), ``patch_glyph`` (the same for digit glyphs) and
    ``centre`` (bool: an object's centre falls in the patch)."""

    presence: torch.Tensor
    patch_object: torch.Tensor
    patch_glyph: torch.Tensor
    centre: torch.Tensor
    objects: ObjectTargets


def _covering(view_boxes: torch.Tensor, tile_px: int, patch_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of each box in each patch ``[V, O, P]`` and each box's area ``[V, O]`` (view pixels)."""
    edges = torch.arange(0, tile_px + 1, patch_px, dtype=torch.float32)  # [S+1]
    lo, hi = edges[:-1], edges[1:]  # [S]

    def overlap(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:  # [V, O] -> [V, O, S]
        return (torch.minimum(end[..., None], hi) - torch.maximum(start[..., None], lo)).clamp(min=0)

    cover = overlap(view_boxes[..., 1], view_boxes[..., 3])[..., :, None] \
        * overlap(view_boxes[..., 0], view_boxes[..., 2])[..., None, :]  # [V, O, S, S]
    area = (view_boxes[..., 2] - view_boxes[..., 0]) * (view_boxes[..., 3] - view_boxes[..., 1])
    return cover.flatten(2), area


def _most_covering(cover: torch.Tensor, area: torch.Tensor, patch_px: int) -> torch.Tensor:
    """Per patch the box holding the most of it among those holding ``MIN_COVER`` of the patch or of
    the box (small boxes in the thumbnail count too); -1 where none. ``[V, P]``."""
    enough = cover >= MIN_COVER * area.clamp(max=float(patch_px * patch_px))[..., None]  # [V, O, P]
    if cover.shape[1] == 0:
        return torch.full((cover.shape[0], cover.shape[2]), -1, dtype=torch.long)
    best = torch.where(enough, cover, torch.zeros(())).max(1)
    return torch.where(best.values > 0, best.indices, torch.full_like(best.indices, -1))


def view_labels(scene: Scene, grid_pinpoints, tile_px: int = 336, patch_px: int = 14) -> ViewLabels:
    """Labels of every view of a scene (P = (tile_px / patch_px) ** 2 patches per view)."""
    targets = object_targets(scene)
    transforms = view_transforms(scene, grid_pinpoints, tile_px)  # [V, 4]
    scale, offset = transforms[:, None, [0, 1, 0, 1]], transforms[:, None, [2, 3, 2, 3]]  # [V, 1, 4]
    cover, area = _covering(targets.boxes[None] * scale - offset, tile_px, patch_px)  # [V, O, P], [V, O]
    shown = cover.sum(-1) / area >= MIN_VISIBLE  # [V, O]
    presence = (shown.float() @ targets.presence.float()) > 0  # [V, K]
    glyph_cover, glyph_area = _covering(targets.glyph_boxes[None] * scale - offset, tile_px, patch_px)

    side = tile_px // patch_px
    view_boxes = targets.boxes[None] * scale - offset  # [V, O, 4]
    cx, cy = (view_boxes[..., 0] + view_boxes[..., 2]) / 2, (view_boxes[..., 1] + view_boxes[..., 3]) / 2
    inside = (cx >= 0) & (cx < tile_px) & (cy >= 0) & (cy < tile_px)  # [V, O]
    patch = (cy // patch_px).long().clamp(0, side - 1) * side + (cx // patch_px).long().clamp(0, side - 1)
    centre = torch.zeros(len(transforms), side * side, dtype=torch.bool)
    views = torch.arange(len(transforms))[:, None].expand_as(patch)
    centre[views[inside], patch[inside]] = True
    return ViewLabels(presence, _most_covering(cover, area, patch_px), _most_covering(glyph_cover, glyph_area, patch_px),
                      centre, targets)
