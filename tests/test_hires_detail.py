"""The hires_detail benchmark: deterministic, disjoint splits, balanced answers at the stated chance,
answers that match the pixels, and objects that a crop shows at full size."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from benchmarks import build_benchmark
from benchmarks.hires_detail import (
    ANSWERS,
    BOX_PX,
    CATEGORIES,
    CHANCE,
    GRID_SIZES,
    SHAPE_PX,
    SPLITS,
    HiresDetailBenchmark,
    every_question_text,
    make_split_item,
    render,
)
from benchmarks.synthetic import COLORS, GRID_PINPOINTS, SHORT_ANSWER_SUFFIX, expected_grid

ROOT = Path(__file__).resolve().parents[1]


def digest(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def scene_key(scene) -> tuple:
    return scene.shapes, scene.boxes, scene.texture_seed


@pytest.fixture(scope="module")
def first() -> list:
    """The first 10 test samples (every category x grid pair of 10 consecutive indices: 4 and 5 are coprime)."""
    return list(build_benchmark({"name": "hires_detail", "num_samples": 10}))


def test_config_builds_the_default_benchmark():
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/benchmark/hires_detail.yaml"))
    benchmark = build_benchmark(cfg)
    assert isinstance(benchmark, HiresDetailBenchmark)
    assert (benchmark.split, benchmark.seed, len(benchmark), benchmark.max_new_tokens) == ("test", 0, 40, 4)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("split", "dev", "benchmark.split must be one of train, val, test, got 'dev'"),
    ("num_samples", 1001, "num_samples=1001 exceeds the test split's 1000 samples"),
    ("num_samples", 0, "benchmark.num_samples must be a positive integer, got 0"),
    ("seed", "0", "benchmark.seed must be an integer, got '0'"),
])
def test_bad_values_fail_naming_them(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_benchmark({"name": "hires_detail", key: value})


def test_same_index_gives_the_same_sample(first):
    again = HiresDetailBenchmark(num_samples=3)
    for a, b in zip(first[:3], again):
        assert (a.id, a.question, a.answers, a.meta) == (b.id, b.question, b.answers, b.meta)
        assert digest(a.image) == digest(b.image)


def test_identical_in_a_fresh_process_with_another_hash_seed(first):
    code = ("from benchmarks.hires_detail import HiresDetailBenchmark; import hashlib\n"
            "for s in HiresDetailBenchmark(num_samples=3): print(s.id, s.answers[0], "
            "hashlib.sha256(s.image.tobytes()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == [f"{s.id} {s.answers[0]} {digest(s.image)}" for s in first[:3]]


def test_splits_are_disjoint_streams():
    """No scene (objects + texture) of the first 300 samples of one split occurs in another."""
    keys = {split: {scene_key(make_split_item(split, 0, i)[0]) for i in range(300)} for split in SPLITS}
    assert all(len(k) == 300 for k in keys.values())
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    ids = {split: set(HiresDetailBenchmark(split=split, num_samples=50).sample_ids()) for split in SPLITS}
    assert not ids["train"] & ids["val"] and not ids["val"] & ids["test"] and not ids["train"] & ids["test"]


def test_categories_and_grids_are_balanced_and_images_are_their_canvas(first):
    assert [s.meta["category"] for s in first] == [CATEGORIES[i % 4] for i in range(10)]
    assert [s.meta["grid"] for s in first] == [list(GRID_SIZES)[i % 5] for i in range(10)]
    assert set(GRID_SIZES) == {"1x2", "2x1", "2x2", "1x3", "3x1"}
    for sample in first:
        height, width = sample.image.height, sample.image.width
        rows, cols, canvas_h, canvas_w = expected_grid((height, width))
        assert (canvas_h, canvas_w) == (height, width) and f"{rows}x{cols}" == sample.meta["grid"]
        assert [height, width] in [list(p) for p in GRID_PINPOINTS]


def test_answers_are_uniform_so_chance_is_as_stated():
    """Over the whole test split, each category's answers are near uniform: always guessing the most
    frequent answer scores within 5 points of the stated chance, and every answer occurs."""
    answers = {c: Counter() for c in CATEGORIES}
    for index in range(SPLITS["test"]):
        _, question, _ = make_split_item("test", 0, index)
        answers[question.category][question.answer] += 1
    for category, counts in answers.items():
        assert set(counts) == set(ANSWERS[category])
        assert CHANCE[category] == pytest.approx(1 / len(ANSWERS[category]))
        assert max(counts.values()) / sum(counts.values()) <= CHANCE[category] + 0.05, (category, counts)


def test_questions_use_the_template_and_name_existing_things(first):
    texts = set(every_question_text())
    for sample in first:
        assert sample.question.endswith(SHORT_ANSWER_SUFFIX)
        assert sample.question.removesuffix(SHORT_ANSWER_SUFFIX) in texts
        assert sample.answers[0] in ANSWERS[sample.meta["category"]]


def _pixel(image, x: float, y: float) -> tuple:
    return image.getpixel((int(x), int(y)))


def test_answers_match_the_pixels(first):
    """Read every answer back from the image: the target shape's colour at its centre, the box's frame
    colour and a dark digit inside it, and count/presence from the shapes actually drawn there."""
    for sample in first:
        image, meta, answer = sample.image, sample.meta, sample.answers[0]
        objects = meta["objects"]
        for obj in objects:
            left, top, right, bottom = obj["box"]
            if obj["kind"] == "box":
                assert _pixel(image, left + 1, top + 1) == COLORS[obj["color"]]
                inside = np.asarray(image.crop((left + 4, top + 4, right - 4, bottom - 4)))
                assert (inside.max(-1) < 80).sum() >= 15  # the digit's black strokes
            else:
                assert _pixel(image, (left + right) / 2, (top + bottom) / 2) == COLORS[obj["color"]]
        shapes = [o for o in objects if o["kind"] != "box"]
        target = meta["target"]
        if meta["category"] == "color":
            assert [o["color"] for o in shapes if o["kind"] == target["kind"]] == [answer]
        elif meta["category"] == "digit":
            assert [o["digit"] for o in objects if o["kind"] == "box" and o["color"] == target["color"]] == [answer]
        elif meta["category"] == "count":
            assert sum(o["kind"] == target["kind"] for o in shapes) == int(answer)
        else:
            assert any(o["kind"] == target["kind"] for o in shapes)  # the kind is always there
            found = any(o["kind"] == target["kind"] and o["color"] == target["color"] for o in shapes)
            assert answer == ("yes" if found else "no")


def test_objects_are_small_inside_and_apart():
    """Sizes as documented, inside the image, never overlapping; 80 scenes (no pixels drawn)."""
    for index in range(80):
        scene, _, _ = make_split_item("val", 0, index)
        boxes = [(s.box, SHAPE_PX) for s in scene.shapes] + [(b.box, BOX_PX) for b in scene.boxes]
        height, width = scene.image_hw
        for (left, top, right, bottom), (low, high) in boxes:
            assert low <= right - left == bottom - top <= high
            assert 0 <= left and 0 <= top and right <= width and bottom <= height
        for i, (a, _) in enumerate(boxes):
            for b, _ in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_render_is_deterministic_per_scene():
    scene, _, _ = make_split_item("train", 0, 7)
    assert digest(render(scene)) == digest(render(scene))
