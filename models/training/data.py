"""Training examples from the ``hires_detail`` train split: tiles and labels (stage 1), conversations (stage 2).

Stage 1 uses train images ``0 .. vision.images - 1``, stage 2 the next ``language.images``; the
val and test splits are other RNG streams (``benchmarks.hires_detail.item_rng``), never seen here.
"""

from __future__ import annotations

import torch

from benchmarks.hires_detail import (
    BASE_TINTS,
    BOX_COLORS,
    BOX_PX,
    DIGITS,
    GRID_SIZES,
    GRIDS,
    MAX_PER_KIND,
    SHAPE_COLORS,
    SHAPE_PX,
    DigitBox,
    Question,
    Scene,
    all_questions,
    item_rng,
    make_split_item,
    place_in_cells,
    render,
)
from benchmarks.synthetic import SHAPES, Shape
from compressors.geometry import AnyResLayout, layout_for_image
from models.training.conversation import Conversation, build_conversation, training_turns
from models.training.labels import view_labels
from models.training.stages import VisionTargets

SPLIT = "train"
VISION_DENSITY = 3  # stage-1 scenes hold this many times the benchmark's objects


def training_item(data_seed: int, index: int, max_turns: int) -> tuple[Scene, list[Question]]:
    """Train image ``index``: its scene and conversation turns (the benchmark-format question first)."""
    scene, primary, rng = make_split_item(SPLIT, data_seed, index)
    return scene, training_turns(rng, primary, all_questions(rng, scene), max_turns)


def image_tiles(processor, scene: Scene) -> torch.Tensor:
    """The processor's tiles of the rendered scene, ``[T, 3, 336, 336]`` (thumbnail first)."""
    pixel_values = processor.image_processor(render(scene), return_tensors="pt")["pixel_values"]  # [1, T, 3, H, W]
    return pixel_values[0]


def vision_scene(data_seed: int, index: int) -> Scene:
    """Stage-1 image ``index``: the benchmark's objects on its canvases and textures, ``VISION_DENSITY``
    times as many, so every view the tower trains on holds more labelled patches (digits most of all)."""
    rng = item_rng(SPLIT, data_seed, index)
    grid = GRIDS[index % len(GRIDS)]
    kinds = [kind for kind in SHAPES for _ in range(rng.randint(0, VISION_DENSITY * MAX_PER_KIND))]
    colors = [rng.choice(SHAPE_COLORS) for _ in kinds]
    num_boxes = rng.randint(VISION_DENSITY, 3 * VISION_DENSITY)
    box_colors = [rng.choice(BOX_COLORS) for _ in range(num_boxes)]
    digits = [rng.choice(DIGITS) for _ in range(num_boxes)]
    sizes = [rng.randint(*SHAPE_PX) for _ in kinds] + [rng.randint(*BOX_PX) for _ in range(num_boxes)]
    boxes = place_in_cells(rng, GRID_SIZES[grid], sizes)
    return Scene(grid=grid, image_hw=GRID_SIZES[grid],
                 shapes=tuple(Shape(k, c, b) for k, c, b in zip(kinds, colors, boxes)),
                 boxes=tuple(DigitBox(d, c, b) for d, c, b in zip(digits, box_colors, boxes[len(kinds):])),
                 tint=rng.choice(BASE_TINTS), texture_seed=rng.getrandbits(63))


def vision_example(processor, config, data_seed: int, index: int) -> tuple[torch.Tensor, VisionTargets]:
    """Tiles ``[T, 3, 336, 336]`` and stage-1 targets of stage-1 image ``index``."""
    scene = vision_scene(data_seed, index)
    vision = config.vision_config
    labels = view_labels(scene, config.image_grid_pinpoints, vision.image_size, vision.patch_size)
    return image_tiles(processor, scene), VisionTargets.of(labels)


def scene_layout(config, scene: Scene) -> AnyResLayout:
    return layout_for_image(scene.image_hw, config.image_grid_pinpoints, config.vision_config.image_size,
                            config.vision_config.patch_size)


def language_example(tokenizer, config, data_seed: int, index: int, max_turns: int,
                     independent_turns: bool = False) -> tuple[AnyResLayout, Conversation]:
    """The layout and the conversation of train image ``index`` (its tower features are cached apart)."""
    scene, turns = training_item(data_seed, index, max_turns)
    layout = scene_layout(config, scene)
    conversation = build_conversation(tokenizer, turns, config.image_token_id, layout.vanilla_token_count(),
                                      independent=independent_turns)
    return layout, conversation
