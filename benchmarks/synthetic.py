"""``synthetic``: seeded drawings with one-word answers, so a run needs no data set and no network.

Sample ``i`` is drawn from its own RNG, ``random.Random(f"{seed}:{i}")`` (string seeds hash with
SHA-512, so the same seed gives byte-identical images in any process), which makes ``sample[i]``
O(1) and keeps the first N samples the same whatever ``num_samples`` or ``limit`` are.

Image sizes cycle through LLaVA-NeXT's five AnyRes grids (``i % 5``), with sizes that fit a
canvas exactly, need padding (480x640) or are odd (555x601); question categories cycle with
``i % 4``, so both are balanced and every grid and category occurs in the first 20 samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from benchmarks.base import Benchmark, Sample, check_positive_int
from benchmarks.registry import register_benchmark
from benchmarks.scoring import ExactMatchScorer

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."

# LLaVA-NeXT (vicuna / mistral) image_grid_pinpoints, as (height, width); crops are 336 px.
GRID_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
CROP_SIZE = 336

# (height, width) pools per expected grid; tests check each size really gets its grid.
_WIDE_1X2 = ((336, 672), (400, 800), (480, 960), (299, 601), (333, 667))
_WIDE_1X3 = ((336, 1008), (300, 1000), (251, 911), (333, 701), (280, 900))
SIZES_BY_GRID: dict[str, tuple[tuple[int, int], ...]] = {
    "1x2": _WIDE_1X2,
    "2x1": tuple((w, h) for h, w in _WIDE_1X2),
    "2x2": ((672, 672), (480, 640), (640, 480), (555, 601), (417, 523), (700, 700)),
    "1x3": _WIDE_1X3,
    "3x1": tuple((w, h) for h, w in _WIDE_1X3),
}
GRIDS: tuple[str, ...] = tuple(SIZES_BY_GRID)

CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "text")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated, well-separated colours; backgrounds are light neutrals that share no name with them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 10),
    "orange": (245, 125, 15),
    "purple": (130, 50, 170),
    "black": (15, 15, 15),
}
COLOR_ALIASES: dict[str, tuple[str, ...]] = {"purple": ("violet",)}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (232, 232, 232), (246, 240, 224))
TEXT_COLORS: tuple[str, ...] = ("black", "blue", "red", "green", "purple")
WORDS: tuple[str, ...] = (
    "apple", "river", "cloud", "house", "tiger", "piano", "lemon", "train", "chair", "robot",
    "ocean", "candle", "garden", "rocket", "pencil", "window", "forest", "butter", "planet", "zebra",
)
MAX_COUNT = 6


@dataclass(frozen=True)
class Shape:
    """A filled shape inside the half-open pixel box ``[left, right) x [top, bottom)``."""

    kind: str
    color: str
    box: tuple[int, int, int, int]  # left, top, right, bottom

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "color": self.color, "box": list(self.box)}


def expected_grid(image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(rows, cols, canvas_h, canvas_w) that LLaVA-NeXT's AnyRes picks for an (H, W) image."""
    # Imported here: transformers costs seconds to import, and listing ids or validating a
    # config must not pay for it.
    from transformers.image_processing_utils import select_best_resolution

    canvas_h, canvas_w = select_best_resolution(tuple(image_hw), [list(p) for p in GRID_PINPOINTS])
    return canvas_h // CROP_SIZE, canvas_w // CROP_SIZE, canvas_h, canvas_w


def place_boxes(rng: random.Random, image_hw: tuple[int, int], count: int) -> list[tuple[int, int, int, int]]:
    """``count`` square boxes, one per distinct cell of a grid of square-ish cells.

    Cells make placement O(1) (no rejection loop) and keep a margin inside each cell, so
    shapes never touch (two touching squares would read as one rectangle); the
    coarsest grid (2, then 3, ... cells on the short side) with enough cells keeps shapes large.
    """
    height, width = image_hw
    for per_short_side in range(2, 6):
        side = min(height, width) // per_short_side
        rows, cols = height // side, width // side
        if rows * cols >= count:
            break
    else:
        raise ValueError(f"cannot place {count} shapes in a {height}x{width} image")
    cell_h, cell_w = height // rows, width // cols
    short = min(cell_h, cell_w)
    margin = short // 10  # shapes in neighbouring cells stay >= 2 * margin apart, never touching
    boxes = []
    for cell in rng.sample(range(rows * cols), count):
        row, col = divmod(cell, cols)
        size = rng.randint(int(0.45 * short), int(0.75 * short))
        left = col * cell_w + rng.randint(margin, cell_w - size - margin)
        top = row * cell_h + rng.randint(margin, cell_h - size - margin)
        boxes.append((left, top, left + size, top + size))
    return boxes


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    """Fill ``shape`` (PIL boxes are inclusive, ours half-open, hence the -1)."""
    left, top, right, bottom = shape.box
    fill = COLORS[shape.color]
    if shape.kind == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    elif shape.kind == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([((left + right - 1) // 2, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; allowed: {', '.join(SHAPES)}")


def _distinct_shapes(rng: random.Random, image_hw: tuple[int, int]) -> list[Shape]:
    """1-3 shapes with pairwise different kinds and colours, so any one is named by either."""
    count = rng.randint(1, len(SHAPES))
    kinds = rng.sample(SHAPES, count)
    colors = rng.sample(list(COLORS), count)
    return [Shape(k, c, b) for k, c, b in zip(kinds, colors, place_boxes(rng, image_hw, count))]


def _count_shapes(rng: random.Random, image_hw: tuple[int, int]) -> list[Shape]:
    """1-6 squares of one colour plus 0-2 circles/triangles in other colours (squares first)."""
    squares = rng.randint(1, MAX_COUNT)
    distractors = rng.randint(0, 2)
    square_color, *others = rng.sample(list(COLORS), 3)
    boxes = place_boxes(rng, image_hw, squares + distractors)
    shapes = [Shape("square", square_color, box) for box in boxes[:squares]]
    shapes += [Shape(rng.choice(("circle", "triangle")), rng.choice(others), box) for box in boxes[squares:]]
    return shapes


def _draw_word(rng: random.Random, draw: ImageDraw.ImageDraw, image_hw: tuple[int, int], word: str,
               color: str) -> tuple[int, int, int, int]:
    """Write ``word`` large, at a random position fully inside the image; returns its pixel box."""
    height, width = image_hw
    size = max(12, min(height, width) // 4)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    while right - left > 0.9 * width and size > 12:  # long word on a narrow image: shrink to fit
        size = max(12, int(size * 0.8))
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = rng.randint(-left, max(-left, width - right))
    y = rng.randint(-top, max(-top, height - bottom))
    draw.text((x, y), word, font=font, fill=COLORS[color])
    return x + left, y + top, x + right, y + bottom


def make_sample(seed: int, index: int) -> Sample:
    """Sample ``index`` of the benchmark with ``seed``; depends on nothing else."""
    rng = random.Random(f"{seed}:{index}")
    grid = GRIDS[index % len(GRIDS)]
    category = CATEGORIES[index % len(CATEGORIES)]
    height, width = rng.choice(SIZES_BY_GRID[grid])
    background = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    meta: dict[str, Any] = {"category": category, "seed": seed, "index": index}
    shapes: list[Shape] = []

    if category == "color":
        shapes = _distinct_shapes(rng, (height, width))
        target = shapes[0]
        question, answers = f"What color is the {target.kind}?", (target.color, *COLOR_ALIASES.get(target.color, ()))
        meta["target"] = target.to_meta()
    elif category == "shape":
        shapes = _distinct_shapes(rng, (height, width))
        target = shapes[0]
        question, answers = f"What shape is the {target.color} object?", (target.kind,)
        meta["target"] = target.to_meta()
    elif category == "count":
        shapes = _count_shapes(rng, (height, width))
        count = sum(s.kind == "square" for s in shapes)
        question, answers = "How many squares are there?", (str(count),)
        meta["count"] = count
    else:  # text
        word = rng.choice(WORDS)
        color = rng.choice(TEXT_COLORS)
        meta["word"] = word
        meta["text_box"] = list(_draw_word(rng, draw, (height, width), word, color))
        question, answers = "What word is written in the image?", (word,)

    for shape in shapes:
        draw_shape(draw, shape)
    if shapes:
        meta["shapes"] = [s.to_meta() for s in shapes]

    rows, cols, canvas_h, canvas_w = expected_grid((height, width))
    meta.update(grid=f"{rows}x{cols}", image_hw=[height, width], canvas_hw=[canvas_h, canvas_w],
                background=list(background))
    return Sample(id=sample_id(seed, index), image=image, question=question + SHORT_ANSWER_SUFFIX,
                  answers=answers, meta=meta)


def sample_id(seed: int, index: int) -> str:
    """The resume key of sample ``index``; cheap, so ``sample_ids()`` never draws anything."""
    return f"synthetic-s{seed}-{index:04d}"


@register_benchmark("synthetic")
class SyntheticBenchmark(Benchmark):
    """Seeded colour / shape / count / word questions on drawings covering every AnyRes grid."""

    def __init__(self, seed: int = 0, num_samples: int = 24, limit: int | None = None,
                 max_new_tokens: int = 16) -> None:
        super().__init__(limit=limit, max_new_tokens=max_new_tokens)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"benchmark.seed must be an integer, got {seed!r} ({type(seed).__name__})")
        self.seed = seed
        self.num_samples = check_positive_int("num_samples", num_samples)

    def _num_available(self) -> int:
        return self.num_samples

    def _sample_id(self, index: int) -> str:
        return sample_id(self.seed, index)

    def _load(self, index: int) -> Sample:
        return make_sample(self.seed, index)

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> ExactMatchScorer:
        """Exact match after ``normalize_answer`` against any reference answer (one rule for every variant)."""
        return ExactMatchScorer(variant)
