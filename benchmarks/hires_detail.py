"""``hires_detail``: small objects on textured high-resolution images, questions only a crop answers.

Each image has the size of one of LLaVA-NeXT's five canvases (1x2, 2x1, 2x2, 1x3, 3x1 crops of
336 px), so every crop shows the image at its own resolution while the 336 px thumbnail squeezes
it by 2x or 3x along the long side. On a textured background sit 0-3 circles, 0-3 squares and
0-3 triangles (18-26 px, in seven colours) and 1-3 framed boxes with a digit (34-38 px, the digit
18 px tall, drawn with PIL's own font). Objects are centred on corners of the crops' 14 px patch
grid, so a crop always shows a shape as the same 2 x 2 patches and a digit as the same four
quarters; the thumbnail halves or thirds them (a digit becomes 6-9 px wide) off that grid.

Four question types, balanced, with uniformly distributed answers by construction (so uniform
guessing is the best answer-prior and ``CHANCE`` is each type's chance level):

* ``color``: "What color is the {shape}?" (that shape occurs once; 7 colours, chance 1/7);
* ``digit``: "Which digit is in the {color} box?" (10 digits, chance 1/10);
* ``presence``: "Is there a(n) {color} {shape}?" (yes/no, chance 1/2; the shape is always present,
  and a "no" names, where it can, a colour that another shape has, so it tests the binding);
* ``count``: "How many {shape}s are there?" (0-3, chance 1/4).

Splits are fixed: sample ``i`` of split ``s`` comes from ``random.Random("hires_detail:{s}:{seed}:{i}")``
(string seeds hash with SHA-512: identical in every process), so the three splits are independent
streams and ``sample[i]`` is O(1). ``train`` is for training, ``val`` for monitoring it, ``test``
for reporting only. Building the scene and question is cheap; only ``render`` draws pixels.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks.base import Benchmark, Sample, check_positive_int
from benchmarks.registry import register_benchmark
from benchmarks.scoring import ExactMatchScorer
from benchmarks.synthetic import COLORS, CROP_SIZE, GRID_PINPOINTS, SHAPES, SHORT_ANSWER_SUFFIX, Shape, draw_shape

# Each grid's image is its canvas, (height, width) in pixels: crops are the image's own pixels.
GRID_SIZES: dict[str, tuple[int, int]] = {f"{h // CROP_SIZE}x{w // CROP_SIZE}": (h, w) for h, w in GRID_PINPOINTS}
GRIDS: tuple[str, ...] = tuple(GRID_SIZES)
CATEGORIES: tuple[str, ...] = ("color", "digit", "presence", "count")
SPLITS: dict[str, int] = {"train": 1_000_000, "val": 1_000, "test": 1_000}  # samples available per split

SHAPE_COLORS: tuple[str, ...] = tuple(COLORS)  # red green blue yellow orange purple black
BOX_COLORS: tuple[str, ...] = ("red", "green", "blue", "orange", "purple")
DIGITS: tuple[str, ...] = tuple("0123456789")
MAX_PER_KIND = 3
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": SHAPE_COLORS,
    "digit": DIGITS,
    "presence": ("yes", "no"),
    "count": tuple(str(n) for n in range(MAX_PER_KIND + 1)),
}
CHANCE: dict[str, float] = {category: 1 / len(answers) for category, answers in ANSWERS.items()}

SHAPE_PX = (18, 26)  # side of a shape's square box, inclusive range
BOX_PX = (34, 38)  # side of a digit box
BOX_BORDER_PX = 3
DIGIT_FONT_PX = 25  # PIL's default FreeType font: digits about 19 px tall, 14 px wide
CELL_PX = 56  # objects sit in distinct cells of 4 x 4 patches, so they never touch
PATCH_PX = 14  # CLIP's patch: crops start at multiples of 336 = 24 patches, so the grids coincide
BASE_TINTS: tuple[tuple[int, int, int], ...] = ((236, 230, 218), (224, 231, 236), (231, 236, 222), (238, 238, 238))


@dataclass(frozen=True)
class DigitBox:
    """A white box with a coloured frame and a black digit, in the half-open pixel box ``box``."""

    digit: str
    color: str
    box: tuple[int, int, int, int]  # left, top, right, bottom

    def to_meta(self) -> dict[str, Any]:
        return {"kind": "box", "color": self.color, "digit": self.digit, "box": list(self.box)}


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image (and to label it for training)."""

    grid: str
    image_hw: tuple[int, int]
    shapes: tuple[Shape, ...]
    boxes: tuple[DigitBox, ...]
    tint: tuple[int, int, int]
    texture_seed: int

    def count(self, kind: str) -> int:
        return sum(shape.kind == kind for shape in self.shapes)

    def to_meta(self) -> dict[str, Any]:
        return {"grid": self.grid, "image_hw": list(self.image_hw),
                "objects": [s.to_meta() for s in self.shapes] + [b.to_meta() for b in self.boxes]}


@dataclass(frozen=True)
class Question:
    """One question about a scene, its single reference answer and what it is about."""

    category: str
    text: str  # without the answer-format suffix
    answer: str
    target: dict[str, Any]


def place_in_cells(rng: random.Random, image_hw: tuple[int, int], sizes: list[int]) -> list[tuple[int, int, int, int]]:
    """Square pixel boxes of the given sides, each in its own random cell of ``CELL_PX``, centred on a
    corner of the 14 px patch grid (so a crop always cuts an object into the same patches) with at
    least one pixel to spare inside its cell (objects never touch)."""
    rows, cols = image_hw[0] // CELL_PX, image_hw[1] // CELL_PX
    boxes = []
    for cell, size in zip(rng.sample(range(rows * cols), len(sizes)), sizes):
        row, col = divmod(cell, cols)
        half = size // 2
        centres = [c for c in range(PATCH_PX, CELL_PX, PATCH_PX) if c - half >= 1 and c - half + size <= CELL_PX - 1]
        cx = col * CELL_PX + rng.choice(centres)
        cy = row * CELL_PX + rng.choice(centres)
        boxes.append((cx - half, cy - half, cx - half + size, cy - half + size))
    return boxes


def make_scene(rng: random.Random, grid: str, counts: dict[str, int] | None = None,
               colors: dict[str, str] | None = None) -> Scene:
    """A random scene on ``grid``.

    Args:
        counts: shapes per kind; kinds left out get 0..3 uniformly.
        colors: the colour of the first shape of a kind (the others are uniform over ``SHAPE_COLORS``).
    """
    counts = {kind: (counts or {}).get(kind, rng.randint(0, MAX_PER_KIND)) for kind in SHAPES}
    kinds = [kind for kind in SHAPES for _ in range(counts[kind])]
    shape_colors = [rng.choice(SHAPE_COLORS) for _ in kinds]
    for kind, color in (colors or {}).items():
        shape_colors[kinds.index(kind)] = color
    num_boxes = rng.randint(1, 3)
    box_colors = rng.sample(BOX_COLORS, num_boxes)
    digits = rng.sample(DIGITS, num_boxes)

    image_hw = GRID_SIZES[grid]
    sizes = [rng.randint(*SHAPE_PX) for _ in kinds] + [rng.randint(*BOX_PX) for _ in range(num_boxes)]
    boxes = place_in_cells(rng, image_hw, sizes)
    shapes = tuple(Shape(kind, color, box) for kind, color, box in zip(kinds, shape_colors, boxes))
    digit_boxes = tuple(DigitBox(digit, color, box) for digit, color, box in zip(digits, box_colors, boxes[len(kinds):]))
    return Scene(grid=grid, image_hw=image_hw, shapes=shapes, boxes=digit_boxes, tint=rng.choice(BASE_TINTS),
                 texture_seed=rng.getrandbits(63))


# -- questions ----------------------------------------------------------------------------------


def color_text(kind: str) -> str:
    return f"What color is the {kind}?"


def digit_text(color: str) -> str:
    return f"Which digit is in the {color} box?"


def presence_text(kind: str, color: str) -> str:
    return f"Is there {'an' if color[0] in 'aeiou' else 'a'} {color} {kind}?"


def count_text(kind: str) -> str:
    return f"How many {kind}s are there?"


def every_question_text() -> list[str]:
    """Every question the task can ask (without the answer-format suffix)."""
    texts = [color_text(kind) for kind in SHAPES] + [count_text(kind) for kind in SHAPES]
    texts += [presence_text(kind, color) for kind in SHAPES for color in SHAPE_COLORS]
    return texts + [digit_text(color) for color in BOX_COLORS]


def color_question(scene: Scene, kind: str) -> Question:
    (shape,) = [s for s in scene.shapes if s.kind == kind]  # the question needs exactly one
    return Question("color", color_text(kind), shape.color, shape.to_meta())


def digit_question(box: DigitBox) -> Question:
    return Question("digit", digit_text(box.color), box.digit, box.to_meta())


def presence_question(scene: Scene, kind: str, color: str) -> Question:
    answer = "yes" if any(s.kind == kind and s.color == color for s in scene.shapes) else "no"
    return Question("presence", presence_text(kind, color), answer, {"kind": kind, "color": color})


def count_question(scene: Scene, kind: str) -> Question:
    return Question("count", count_text(kind), str(scene.count(kind)), {"kind": kind})


def absent_color(rng: random.Random, scene: Scene, kind: str) -> str:
    """A colour no ``kind`` has; where possible one that another shape has (so colour alone won't do)."""
    own = {s.color for s in scene.shapes if s.kind == kind}
    elsewhere = sorted({s.color for s in scene.shapes if s.kind != kind} - own)
    return rng.choice(elsewhere or [c for c in SHAPE_COLORS if c not in own])


def make_item(rng: random.Random, category: str, grid: str) -> tuple[Scene, Question]:
    """A scene and one question of ``category`` whose answer is uniform over ``ANSWERS[category]``."""
    kind = rng.choice(SHAPES)
    if category == "color":
        scene = make_scene(rng, grid, counts={kind: 1}, colors={kind: rng.choice(SHAPE_COLORS)})
        return scene, color_question(scene, kind)
    if category == "digit":
        scene = make_scene(rng, grid)
        return scene, digit_question(rng.choice(scene.boxes))
    if category == "presence":
        if rng.random() < 0.5:  # yes: the named shape exists
            color = rng.choice(SHAPE_COLORS)
            scene = make_scene(rng, grid, counts={kind: rng.randint(1, MAX_PER_KIND)}, colors={kind: color})
        else:  # no: the kind is there, not in this colour
            scene = make_scene(rng, grid, counts={kind: rng.randint(1, MAX_PER_KIND)})
            color = absent_color(rng, scene, kind)
        return scene, presence_question(scene, kind, color)
    if category == "count":
        scene = make_scene(rng, grid)
        return scene, count_question(scene, kind)
    raise ValueError(f"unknown hires_detail category {category!r}; allowed: {', '.join(CATEGORIES)}")


def all_questions(rng: random.Random, scene: Scene) -> dict[str, list[Question]]:
    """Every question type the scene supports (for multi-question training conversations)."""
    presence = []
    for kind in SHAPES:
        shapes = [s for s in scene.shapes if s.kind == kind]
        if shapes:
            presence.append(presence_question(scene, kind, rng.choice(shapes).color))
            presence.append(presence_question(scene, kind, absent_color(rng, scene, kind)))
    return {
        "color": [color_question(scene, kind) for kind in SHAPES if scene.count(kind) == 1],
        "digit": [digit_question(box) for box in scene.boxes],
        "presence": presence,
        "count": [count_question(scene, kind) for kind in SHAPES],
    }


# -- pixels -------------------------------------------------------------------------------------


def draw_background(scene: Scene) -> Image.Image:
    """A light tint with low-frequency blotches, fine grain and faint lines (no object colours)."""
    height, width = scene.image_hw
    rng = np.random.default_rng(scene.texture_seed)
    blotches = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(blotches).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    grain = rng.integers(-8, 9, (height, width, 3), dtype=np.int16)  # integer noise: 7x cheaper than normal
    pixels = np.asarray(scene.tint, np.int16) + ((smooth[..., None] - 128) * 4) // 25 + grain
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        x0, x1 = rng.integers(0, width, 2)
        y0, y1 = rng.integers(0, height, 2)
        shade = int(rng.integers(170, 205))
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=(shade, shade, shade), width=1)
    return image


@functools.lru_cache(maxsize=1)
def digit_font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=DIGIT_FONT_PX)


def digit_glyph_box(box: DigitBox) -> tuple[float, float, float, float]:
    """The pixel box of a box's digit (the font's box for it, centred on the box)."""
    left, top, right, bottom = box.box
    x0, y0, x1, y1 = digit_font().getbbox(box.digit, anchor="mm")
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return cx + x0, cy + y0, cx + x1, cy + y1


def draw_digit_box(draw: ImageDraw.ImageDraw, box: DigitBox) -> None:
    """White square, coloured frame, black digit centred on the box."""
    left, top, right, bottom = box.box
    draw.rectangle((left, top, right - 1, bottom - 1), fill=(255, 255, 255), outline=COLORS[box.color],
                   width=BOX_BORDER_PX)
    draw.text(((left + right) / 2, (top + bottom) / 2), box.digit, font=digit_font(), fill=(0, 0, 0), anchor="mm")


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (deterministic: same scene, same bytes)."""
    image = draw_background(scene)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        draw_shape(draw, shape)
    for box in scene.boxes:
        draw_digit_box(draw, box)
    return image


# -- the benchmark ------------------------------------------------------------------------------


def item_rng(split: str, seed: int, index: int) -> random.Random:
    """The RNG of sample ``index`` of ``split``: independent streams per split."""
    return random.Random(f"hires_detail:{split}:{seed}:{index}")


def make_split_item(split: str, seed: int, index: int) -> tuple[Scene, Question, random.Random]:
    """Sample ``index`` of ``split`` (category ``index % 4``, grid ``index % 5``) and its RNG afterwards."""
    if split not in SPLITS:
        raise ValueError(f"unknown hires_detail split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = item_rng(split, seed, index)
    scene, question = make_item(rng, CATEGORIES[index % len(CATEGORIES)], GRIDS[index % len(GRIDS)])
    return scene, question, rng


def sample_id(split: str, seed: int, index: int) -> str:
    return f"hires_detail-{split}-s{seed}-{index:05d}"


def to_sample(split: str, seed: int, index: int, scene: Scene, question: Question) -> Sample:
    meta = {"category": question.category, "split": split, "seed": seed, "index": index,
            "target": question.target, **scene.to_meta()}
    return Sample(id=sample_id(split, seed, index), image=render(scene), question=question.text + SHORT_ANSWER_SUFFIX,
                  answers=(question.answer,), meta=meta)


@register_benchmark("hires_detail")
class HiresDetailBenchmark(Benchmark):
    """Colour / digit / presence / count questions about small objects that only the crops resolve."""

    def __init__(self, split: str = "test", seed: int = 0, num_samples: int = 40, limit: int | None = None,
                 max_new_tokens: int = 4) -> None:
        super().__init__(limit=limit, max_new_tokens=max_new_tokens)
        if split not in SPLITS:
            raise ValueError(f"benchmark.split must be one of {', '.join(SPLITS)}, got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"benchmark.seed must be an integer, got {seed!r} ({type(seed).__name__})")
        num_samples = check_positive_int("num_samples", num_samples)
        if num_samples > SPLITS[split]:
            raise ValueError(f"benchmark.num_samples={num_samples} exceeds the {split} split's {SPLITS[split]} samples")
        self.split, self.seed, self.num_samples = split, seed, num_samples

    def _num_available(self) -> int:
        return self.num_samples

    def _sample_id(self, index: int) -> str:
        return sample_id(self.split, self.seed, index)

    def _load(self, index: int) -> Sample:
        scene, question, _ = make_split_item(self.split, self.seed, index)
        return to_sample(self.split, self.seed, index, scene, question)

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> ExactMatchScorer:
        """Exact match after ``normalize_answer`` ("Three." scores as "3"), one rule for every variant."""
        return ExactMatchScorer(variant)
