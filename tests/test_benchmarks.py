"""The benchmark package: registry errors, the synthetic benchmark's determinism, laziness, grid
coverage and drawing/answer consistency, the short-answer normaliser and the aggregate math."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from benchmarks import Benchmark, Sample, build_benchmark, list_benchmarks, register_benchmark
from benchmarks.registry import benchmark_parameters, get_benchmark_class
from benchmarks.scoring import exact_match, normalize_answer
from benchmarks.synthetic import (
    COLORS,
    GRID_PINPOINTS,
    SHORT_ANSWER_SUFFIX,
    SIZES_BY_GRID,
    WORDS,
    SyntheticBenchmark,
    place_boxes,
)

ROOT = Path(__file__).resolve().parents[1]
PINPOINTS = [list(p) for p in GRID_PINPOINTS]
ALL_GRIDS = {"1x2", "2x1", "2x2", "1x3", "3x1"}


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def default() -> SyntheticBenchmark:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/benchmark/synthetic.yaml"))
    return build_benchmark(cfg)


@pytest.fixture(scope="module")
def samples(default) -> list[Sample]:
    return list(default)


# ---------------------------------------------------------------------------------------------
# Config and registry
# ---------------------------------------------------------------------------------------------


def test_yaml_names_every_constructor_argument_and_builds_the_defaults(default):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/benchmark/synthetic.yaml"))
    assert set(cfg) == {"name", *benchmark_parameters(SyntheticBenchmark)}
    assert isinstance(default, SyntheticBenchmark) and default.name == "synthetic"
    assert (len(default), default.seed, default.limit, default.max_new_tokens) == (24, 0, None, 16)
    assert "synthetic" in list_benchmarks() and list_benchmarks() == sorted(list_benchmarks())
    assert list_benchmarks("syn*") == ["synthetic"] and list_benchmarks("nothing*") == []


def test_unknown_name_lists_registered_names_with_a_hint():
    hint = r"unknown benchmark 'synthetc'\. Did you mean 'synthetic'\?.*Allowed: .*synthetic"
    with pytest.raises(ValueError, match=hint):
        build_benchmark({"name": "synthetc"})
    with pytest.raises(ValueError, match=r"unknown benchmark 'mathvista'\. Allowed: .*synthetic") as err:
        get_benchmark_class("mathvista")
    assert "Did you mean" not in str(err.value)
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_benchmark({"seed": 0})


def test_unknown_key_names_the_key_and_the_allowed_ones():
    allowed = "Allowed: limit, max_new_tokens, num_samples, seed"
    with pytest.raises(ValueError, match=rf"'limt'\. Did you mean 'limit'\? {allowed}"):
        build_benchmark({"name": "synthetic", "limt": 3})


@pytest.mark.parametrize("bad", [0, -1, "3", 2.5, True])
def test_bad_limit_fails_naming_the_value(bad):
    with pytest.raises(ValueError, match=rf"benchmark\.limit must be a positive integer or null.*got {bad!r}"):
        build_benchmark({"name": "synthetic", "limit": bad})


@pytest.mark.parametrize(("key", "bad"), [("num_samples", 0), ("num_samples", "24"), ("max_new_tokens", 0),
                                          ("max_new_tokens", 1.5), ("seed", "0"), ("seed", 1.5), ("seed", False)])
def test_bad_constructor_values_fail_naming_the_key(key, bad):
    with pytest.raises(ValueError, match=rf"benchmark\.{key} must be .*got {bad!r}"):
        build_benchmark({"name": "synthetic", key: bad})


def test_register_rejects_non_benchmarks_and_duplicate_names():
    with pytest.raises(TypeError, match="must decorate a Benchmark subclass"):
        register_benchmark("not-a-benchmark")(dict)

    class Impostor(SyntheticBenchmark):
        pass

    with pytest.raises(ValueError, match="'synthetic' is already registered"):
        register_benchmark("synthetic")(Impostor)
    assert get_benchmark_class("synthetic") is SyntheticBenchmark
    assert "not-a-benchmark" not in list_benchmarks()


def test_sample_validates_answers_and_mode():
    rgb = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="tuple of strings"):
        Sample("x", rgb, "q", ["a"], {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tuple of strings"):
        Sample("x", rgb, "q", (3,), {})  # type: ignore[arg-type]
    assert Sample("x", rgb, "q", (), {}).answers == ()  # a test split: scored only by the official server
    with pytest.raises(ValueError, match="must be RGB"):
        Sample("x", Image.new("L", (4, 4)), "q", ("a",), {})


# ---------------------------------------------------------------------------------------------
# Determinism, limit, laziness
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_samples(samples):
    again = list(build_benchmark({"name": "synthetic"}))
    assert [image_digest(s.image) for s in again] == [image_digest(s.image) for s in samples]
    assert [(s.id, s.question, s.answers, s.meta) for s in again] == [(s.id, s.question, s.answers, s.meta)
                                                                       for s in samples]


def test_different_seed_gives_different_samples(samples):
    other = list(build_benchmark({"name": "synthetic", "seed": 1}))
    assert all(image_digest(a.image) != image_digest(b.image) for a, b in zip(samples, other))
    assert [a.question for a in samples] != [b.question for b in other]
    assert other[0].id == "synthetic-s1-0000" and not set(a.id for a in samples) & set(b.id for b in other)


def test_identical_in_a_fresh_process_with_another_hash_seed(samples):
    # The grid lookup is stubbed in the child so it does not pay for importing transformers;
    # images, questions and answers do not depend on it.
    script = (
        "import hashlib, benchmarks.synthetic as s\n"
        "s.expected_grid = lambda hw: (0, 0, 0, 0)\n"
        "for i in range(0, 24, 5):\n"
        "    x = s.make_sample(0, i)\n"
        "    print(hashlib.sha256(x.image.tobytes()).hexdigest(), repr(x.question), repr(x.answers))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout.splitlines()
    expected = [f"{image_digest(s.image)} {s.question!r} {s.answers!r}" for s in samples[0:24:5]]
    assert out == expected


def test_limit_takes_the_first_samples(default, samples):
    limited = build_benchmark({"name": "synthetic", "limit": 5})
    assert len(limited) == 5
    assert limited.sample_ids() == default.sample_ids()[:5] == [s.id for s in samples[:5]]
    assert [image_digest(s.image) for s in limited] == [image_digest(s.image) for s in samples[:5]]
    assert len(build_benchmark({"name": "synthetic", "limit": 100})) == 24
    with pytest.raises(IndexError, match="out of range for 5 samples"):
        limited[5]
    assert limited[-1].id == samples[4].id


def test_samples_do_not_depend_on_num_samples(samples):
    shorter = build_benchmark({"name": "synthetic", "num_samples": 7})
    assert [image_digest(s.image) for s in shorter] == [image_digest(s.image) for s in samples[:7]]
    longer = build_benchmark({"name": "synthetic", "num_samples": 30})
    assert longer.sample_ids()[:24] == [s.id for s in samples] and longer[29].id == "synthetic-s0-0029"


def test_sample_ids_never_build_samples(default, samples, monkeypatch):
    def no_building(self, index):
        raise AssertionError(f"sample {index} was built")

    monkeypatch.setattr(SyntheticBenchmark, "_load", no_building)
    ids = default.sample_ids()
    assert len(default) == 24
    assert ids == [s.id for s in samples] == [f"synthetic-s0-{i:04d}" for i in range(24)]
    with pytest.raises(AssertionError, match="sample 3 was built"):
        default[3]


# ---------------------------------------------------------------------------------------------
# Content: grids, questions, answers consistent with the drawing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", sorted(SIZES_BY_GRID))
def test_every_size_in_the_pool_gets_its_grid(grid):
    for height, width in SIZES_BY_GRID[grid]:
        canvas_h, canvas_w = select_best_resolution((height, width), PINPOINTS)
        assert f"{canvas_h // 336}x{canvas_w // 336}" == grid, (height, width)


def test_all_grids_padding_and_odd_sizes_occur(samples):
    grids = Counter(s.meta["grid"] for s in samples)
    assert set(grids) == ALL_GRIDS and min(grids.values()) >= 4
    for s in samples:
        height, width = s.meta["image_hw"]
        assert s.image.size == (width, height)
        # an independent route to the grid: the modeling code's (rows, cols)
        rows, cols = get_anyres_image_grid_shape((height, width), PINPOINTS, 336)
        assert s.meta["grid"] == f"{rows}x{cols}" and s.meta["canvas_hw"] == [336 * rows, 336 * cols]
    # needs padding: the aspect ratio differs from its canvas's (e.g. 480x640 on 672x672)
    assert any(h * cw != w * ch for (h, w), (ch, cw) in ((s.meta["image_hw"], s.meta["canvas_hw"]) for s in samples))
    assert any(h % 2 or w % 2 for h, w in (s.meta["image_hw"] for s in samples))


def test_questions_categories_and_answers_are_well_formed(samples):
    assert Counter(s.meta["category"] for s in samples) == {"color": 6, "shape": 6, "count": 6, "text": 6}
    for s in samples:
        assert s.image.mode == "RGB"
        assert s.question.endswith(SHORT_ANSWER_SUFFIX) and s.question.count("\n") == 1
        assert all(normalize_answer(a) == a for a in s.answers), s.answers  # references are in normal form
        assert default_score(s, s.answers[0]) == 1.0


def default_score(sample: Sample, prediction: str) -> float:
    return SyntheticBenchmark().score(prediction, sample)["score"]


def _pixels(sample: Sample) -> np.ndarray:
    return np.asarray(sample.image)


def _assert_shapes_drawn_where_meta_says(sample: Sample) -> None:
    pixels = _pixels(sample)
    height, width = sample.meta["image_hw"]
    boxes = [s["box"] for s in sample.meta["shapes"]]
    for shape in sample.meta["shapes"]:
        left, top, right, bottom = shape["box"]
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        centre = pixels[(top + bottom) // 2, (left + right) // 2]
        assert tuple(centre) == COLORS[shape["color"]], shape
    for i, a in enumerate(boxes):
        assert all(_gap(a, b) >= min(height, width) // 30 for b in boxes[i + 1:]), boxes


def _gap(a, b) -> int:
    """Background pixels between two half-open boxes along the axis that separates them (<= 0: overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def test_placed_boxes_stay_inside_and_never_touch():
    sizes = [hw for pool in SIZES_BY_GRID.values() for hw in pool]
    for trial in range(300):
        rng = random.Random(trial)
        height, width = sizes[trial % len(sizes)]
        boxes = place_boxes(rng, (height, width), rng.randint(1, 8))
        for i, (left, top, right, bottom) in enumerate(boxes):
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert right - left == bottom - top >= 0.1 * min(height, width)  # squares, and not specks
            # a visible gap, so neighbouring squares never read as one rectangle after downscaling
            assert all(_gap(boxes[i], other) >= min(height, width) // 30 for other in boxes[i + 1:]), (trial, boxes)


def test_color_and_shape_answers_match_the_drawing(samples):
    checked = 0
    for s in samples:
        if s.meta["category"] not in ("color", "shape"):
            continue
        _assert_shapes_drawn_where_meta_says(s)
        shapes, target = s.meta["shapes"], s.meta["target"]
        assert shapes[0] == target
        # the question's key names exactly one drawn shape
        assert len({x["kind"] for x in shapes}) == len({x["color"] for x in shapes}) == len(shapes)
        if s.meta["category"] == "color":
            assert s.question.startswith(f"What color is the {target['kind']}?") and s.answers[0] == target["color"]
        else:
            assert s.question.startswith(f"What shape is the {target['color']} object?")
            assert s.answers == (target["kind"],)
        checked += 1
    assert checked == 12


def test_count_answers_match_the_pixels(samples):
    counts = set()
    for s in samples:
        if s.meta["category"] != "count":
            continue
        _assert_shapes_drawn_where_meta_says(s)
        squares = [x for x in s.meta["shapes"] if x["kind"] == "square"]
        assert s.answers == (str(len(squares)),) and s.meta["count"] == len(squares)
        assert len({x["color"] for x in squares}) == 1
        assert all(x["color"] != squares[0]["color"] for x in s.meta["shapes"] if x["kind"] != "square")
        # filled squares in a colour used by nothing else: the pixel count is exactly their area
        colour = np.array(COLORS[squares[0]["color"]], dtype=np.uint8)
        coloured = int(np.all(_pixels(s) == colour, axis=-1).sum())
        assert coloured == sum((r - l) * (b - t) for l, t, r, b in (x["box"] for x in squares))
        counts.add(len(squares))
    assert len(counts) >= 3  # the answers vary


def test_text_is_drawn_inside_its_box_and_nowhere_else(samples):
    words = []
    for s in samples:
        if s.meta["category"] != "text":
            continue
        assert s.answers == (s.meta["word"],) and s.meta["word"] in WORDS
        pixels = _pixels(s)
        drawn = np.any(pixels != np.array(s.meta["background"], dtype=np.uint8), axis=-1)
        left, top, right, bottom = s.meta["text_box"]
        height, width = s.meta["image_hw"]
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        inside = drawn[top:bottom, left:right].sum()
        assert inside > 0.05 * (right - left) * (bottom - top) and inside == drawn.sum()
        words.append(s.meta["word"])
    assert len(words) == 6


# ---------------------------------------------------------------------------------------------
# Scoring and aggregation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "normal"), [
    ("  Red. ", "red"),
    ("RED..", "red"),
    ("The Circle", "circle"),
    ("an apple.", "apple"),
    ("a  blue\n\tsquare", "blue square"),
    ("Three", "3"),
    ("ten.", "10"),
    ("zero", "0"),
    ("eleven", "eleven"),  # only zero..ten are mapped
    ("3.", "3"),
    ("3.5", "3.5"),  # inner periods stay
    ("then", "then"),  # articles are whole words only
    ("theatre", "theatre"),
    ("Red!", "red!"),  # other punctuation is kept
    ("", ""),
    ("The.", ""),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_cases():
    assert exact_match("Three.", ("3",)) == 1.0
    assert exact_match(" the SQUARE", ("square",)) == 1.0
    assert exact_match("violet", ("purple", "violet")) == 1.0
    assert exact_match("4", ("3",)) == 0.0
    assert exact_match("red circle", ("red",)) == 0.0  # no partial credit
    assert exact_match("The circle is red.", ("red",)) == 0.0
    assert exact_match("", ("red",)) == 0.0


def test_benchmark_score(samples):
    count = next(s for s in samples if s.meta["category"] == "count")
    words = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six"}
    spelled = words[count.answers[0]].capitalize() + "."
    assert SyntheticBenchmark().score(spelled, count) == {"score": 1.0,
                                                          "normalized_prediction": count.answers[0]}
    wrong = SyntheticBenchmark().score("seven", count)
    assert wrong["score"] == 0.0 and wrong["normalized_prediction"] == "7"


def test_aggregate_math():
    bench = SyntheticBenchmark()
    records = [
        {"id": "a", "score": 1.0, "meta": {"category": "color"}},
        {"id": "b", "score": 0.0, "meta": {"category": "color"}},
        {"id": "c", "score": 1.0, "meta": {"category": "count"}},
        {"id": "d", "score": 1.0, "meta": {"category": "count"}},
        {"id": "e", "score": 0.0, "meta": {"category": "text"}},
    ]
    assert bench.aggregate(records) == {"accuracy": 60.0, "accuracy/color": 50.0, "accuracy/count": 100.0,
                                        "accuracy/text": 0.0}
    assert bench.aggregate([{"id": "x", "score": 1.0, "meta": {}}, {"id": "y", "score": 0.0}]) == {"accuracy": 50.0}
    with pytest.raises(ValueError, match="no records"):
        bench.aggregate([])


def test_aggregate_over_scored_samples(default, samples):
    def records(predict):
        return [{"id": s.id, "score": default.score(predict(s), s)["score"], "meta": s.meta} for s in samples]

    perfect = default.aggregate(records(lambda s: s.answers[0]))
    assert perfect["accuracy"] == 100.0
    assert {k for k in perfect if k.startswith("accuracy/")} == {f"accuracy/{c}" for c in
                                                                 ("color", "shape", "count", "text")}
    # answer every count question right and nothing else: 6 of 24
    partial = default.aggregate(records(lambda s: s.answers[0] if s.meta["category"] == "count" else "blue"))
    assert partial["accuracy/count"] == 100.0 and partial["accuracy/text"] == 0.0
    blues = sum(s.answers[0] == "blue" for s in samples if s.meta["category"] != "count")
    assert partial["accuracy"] == pytest.approx(100 * (6 + blues) / 24)


def test_benchmark_is_abstract():
    with pytest.raises(TypeError):
        Benchmark()  # type: ignore[abstract]
