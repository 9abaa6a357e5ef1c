"""GlobalCom2 against its definition (hand-computed cases), its properties, and the authors' own outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compressors import AnyResLayout, VisionInput, build_compressor, get_compressor_class
from compressors.globalcom2 import (
    SCORE_SIGNAL,
    CropBox,
    cls_scores,
    crop_ratios,
    crop_valid_boxes,
    global_crop_scores,
    globalcom2_token_count,
    plan_crops,
    region_sums,
    select_crop_tokens,
    select_thumbnail,
)
from tests.conftest import PROPERTY_LAYOUTS

REFERENCE = Path(__file__).parent / "data" / "globalcom2_reference.pt"


def make_input(layout: AnyResLayout, scores: torch.Tensor, dim: int = 3) -> VisionInput:
    """Features that name their source (channel 0: tile, channel 1: patch) and one-head signals."""
    p = layout.tokens_per_tile
    signal = torch.zeros(layout.num_tiles, 1, 1 + p, dtype=scores.dtype)
    signal[:, 0, 1:] = scores
    features = torch.zeros(layout.num_tiles, p, dim, dtype=scores.dtype)
    features[:, :, 0] = torch.arange(layout.num_tiles)[:, None].to(scores.dtype)
    features[:, :, 1] = torch.arange(p)[None, :].to(scores.dtype)
    newline = torch.tensor([-1.0, -1.0, 7.0] + [0.0] * (dim - 3), dtype=scores.dtype)
    return VisionInput(features=features, layout=layout, newline=newline, signals={SCORE_SIGNAL: signal})


def segment_sources(out) -> list[int]:
    """The segment as source ids, -1 for newlines (from the provenance)."""
    sources = torch.full((out.num_tokens,), -1)
    sources[out.provenance.token] = out.provenance.source
    return sources.tolist()


def run(geometry: AnyResLayout, scores: torch.Tensor, **options):
    """``globalcom2`` built from ``options`` (e.g. ratio, layout) applied to ``make_input``."""
    return build_compressor({"name": "globalcom2", **options}).compress_vision(make_input(geometry, scores))


# -- definitions, by hand ------------------------------------------------------------------------


def test_score_is_the_head_mean_without_the_cls_key():
    signal = torch.tensor([[[9.0, 1.0, 2.0, 3.0, 4.0], [9.0, 3.0, 2.0, 1.0, 0.0]]])  # [1 tile, 2 heads, 1 + 4]
    assert cls_scores(signal).tolist() == [[2.0, 2.0, 2.0, 2.0]]


def test_region_sums_by_hand():
    values = torch.arange(16.0)  # a 4 x 4 "thumbnail"
    # 2 x 2 grid: regions are 2 x 2 blocks
    assert region_sums(values, 2, 2).tolist() == [0 + 1 + 4 + 5, 2 + 3 + 6 + 7, 8 + 9 + 12 + 13, 10 + 11 + 14 + 15]
    # 3 rows x 1 col: region height 4 // 3 = 1, the last region takes rows 2 and 3
    assert region_sums(values, 3, 1).tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10 + 11 + 12 + 13 + 14 + 15]
    # 1 row x 3 cols: columns {0}, {1}, {2, 3}
    assert region_sums(values, 1, 3).tolist() == [0 + 4 + 8 + 12, 1 + 5 + 9 + 13, 2 + 3 + 6 + 7 + 10 + 11 + 14 + 15]
    # sums, not means: a 2 x 1 split of 24 x 24 ones gives 288 per region
    assert region_sums(torch.ones(576), 2, 1).tolist() == [288, 288]
    # float64 accumulation: 1 + 1e-9 is lost in float32, kept here
    assert region_sums(torch.tensor([1.0, 1e-9, 0.0, 0.0]), 1, 1)[0] == 1.0 + float(torch.tensor(1e-9))


def test_crop_ratio_formula_by_hand():
    # sums [10 ln 3, 0], temperature 10: exp(shifted) = [1, 1/3] -> p = [3/4, 1/4] (up to the 1e-8)
    sums = np.array([10 * math.log(3), 0.0])
    ratios = crop_ratios(sums, 0.25, 10.0)
    assert ratios.dtype == np.float64
    assert ratios == pytest.approx([0.25 * (1 + 0.75 - 0.5), 0.25 * (1 + 0.25 - 0.5)], abs=1e-8)
    assert ratios.sum() == pytest.approx(2 * 0.25, abs=1e-12)  # sum = n r before clipping
    # r = 0.9: 0.9 * 1.25 = 1.125 is clipped to 1; the excess is not redistributed
    assert crop_ratios(sums, 0.9, 10.0) == pytest.approx([1.0, 0.9 * 0.75], abs=1e-8)
    # the authors' epsilon is in the denominator: p = [1, 1] / (2 + 1e-8)
    equal = crop_ratios(np.zeros(2), 0.5)
    p = 1 / (2 + 1e-8)
    assert equal.tolist() == [0.5 * (1 + p - p)] * 2
    # a higher temperature flattens the allocation
    assert np.ptp(crop_ratios(sums, 0.25, 100.0)) < np.ptp(ratios)
    # no lower clip: 4 crops, one dominant, r = 0.1 -> p = [1 / (1 + 1e-8), ~0, ~0, ~0] (exp(-100) ~ 4e-44):
    # the others get r (1 - p_0 / 4), just above r (1 - 1/4) = 0.075 because of the epsilon
    peaked = crop_ratios(np.array([1000.0, 0.0, 0.0, 0.0]), 0.1)
    p0 = 1 / (1 + 1e-8)
    assert peaked[1:] == pytest.approx([0.1 * (1 - p0 / 4)] * 3, abs=1e-15)
    assert peaked[0] == pytest.approx(0.1 * (1 + p0 - p0 / 4), abs=1e-15)
    assert peaked[1] - 0.075 == pytest.approx(2.5e-10, rel=1e-6)


def test_unpad_split_by_hand():
    # W=1000, H=700 on 2 x 2 (48 x 48 tokens): new_h = int(700 * 0.048) = 33, pad 7 -> rows [7, 41),
    # 34 valid rows: 17 in each crop row
    boxes = crop_valid_boxes(AnyResLayout(2, 2, 24, (700, 1000)))
    assert boxes == [(7, 0, 17, 24), (7, 0, 17, 24), (0, 0, 17, 24), (0, 0, 17, 24)]
    # W=176, H=55 on 1 x 2 (24 x 48): 55 * (48 / 176) = 14.999999999999998; LLaVA's int() gives 14,
    # pad 5 -> rows [5, 19); transformers' round(., 7) gives 15, pad 4 -> rows [4, 20)
    layout = AnyResLayout(1, 2, 24, (55, 176))
    assert crop_valid_boxes(layout) == [(5, 0, 14, 24), (5, 0, 14, 24)]
    hf = layout.valid_box("hf")
    assert (hf.top, hf.bottom) == (4, 20)
    # horizontal padding, 2 x 1 with W=55, H=176: columns [5, 19)
    assert crop_valid_boxes(AnyResLayout(2, 1, 24, (176, 55))) == [(0, 5, 24, 14), (0, 5, 24, 14)]
    # forced 2 x 3, W=300, H=1000 (48 x 72): new_w = int(300 * 0.048) = 14, pad 29 -> columns [29, 43):
    # only the middle crop column [24, 48) is valid, its columns [5, 19)
    assert crop_valid_boxes(AnyResLayout(2, 3, 24, (1000, 300))) == [
        (0, 0, 0, 0), (0, 5, 24, 14), (0, 0, 0, 0), (0, 0, 0, 0), (0, 5, 24, 14), (0, 0, 0, 0)]
    # boxes are CropBox tuples
    assert boxes[0].count == 17 * 24 and isinstance(boxes[0], CropBox)


def test_global_scores_by_hand_bilinear():
    # side 2, 1 x 2 grid, no padding: the 2 x 2 map [[0, 1], [2, 3]] resized to 2 x 4 (align_corners
    # False): source x = (j + 0.5) / 2 - 0.5 = -.25 (clamped to 0), .25, .75, 1.25 (clamped to 1)
    layout = AnyResLayout(1, 2, 2, (2, 4))
    pieces = global_crop_scores(torch.tensor([0.0, 1.0, 2.0, 3.0]), layout)
    assert [p.tolist() for p in pieces] == [[0.0, 0.25, 2.0, 2.25], [0.75, 1.0, 2.75, 3.0]]


def test_global_scores_tile_the_resized_map():
    layout = AnyResLayout(2, 2, 24, (700, 1000))
    thumb = torch.randn(576)
    pieces = global_crop_scores(thumb, layout)
    resized = torch.nn.functional.interpolate(thumb.view(1, 1, 24, 24), size=(34, 48), mode="bilinear",
                                              align_corners=False)[0, 0]
    assert [p.numel() for p in pieces] == [17 * 24] * 4
    assert torch.equal(pieces[0], resized[:17, :24].flatten())
    assert torch.equal(pieces[1], resized[:17, 24:].flatten())
    assert torch.equal(pieces[2], resized[17:, :24].flatten())
    assert torch.equal(pieces[3], resized[17:, 24:].flatten())


def test_global_row_offset_uses_the_rows_first_crop():
    # forced 2 x 3, W=300, H=1000: each row's first crop is empty (height 0), so the second crop row
    # starts at row offset 0 again and crop 4 reads exactly what crop 1 reads (the authors' rule)
    layout = AnyResLayout(2, 3, 24, (1000, 300))
    pieces = global_crop_scores(torch.randn(576), layout)
    assert [p.numel() for p in pieces] == [0, 24 * 14, 0, 0, 24 * 14, 0]
    assert torch.equal(pieces[4], pieces[1])


def test_crop_topk_by_hand():
    # local [3, 4, 0] -> [.6, .8, 0]; global [0, 0, 5] -> [0, 0, 1]; combined [.6, .8, 1] -> top 2: {1, 2}
    kept = select_crop_tokens(torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 5.0]), 2)
    assert set(kept.tolist()) == {1, 2}
    # only the direction of each score matters, not its scale
    kept = select_crop_tokens(torch.tensor([300.0, 400.0, 0.0]), torch.tensor([0.0, 0.0, 0.05]), 2)
    assert set(kept.tolist()) == {1, 2}
    # local [1, 0, 0, 1] -> [.707, 0, 0, .707]; global [0, 2, 1, 2] -> [0, 2/3, 1/3, 2/3] -> top 1: 0 or 3
    assert select_crop_tokens(torch.tensor([1.0, 0, 0, 1]), torch.tensor([0.0, 2, 1, 2]), 1).item() in (0, 3)
    assert select_crop_tokens(torch.tensor([1.0, 0, 0, 1.1]), torch.tensor([0.0, 2, 1, 2]), 1).tolist() == [3]
    assert select_crop_tokens(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), 0).numel() == 0


def test_crop_budgets_are_floors_of_valid_counts():
    layout = AnyResLayout(2, 2, 24, (700, 1000))  # 408 valid tokens per crop
    scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(2))
    plan = plan_crops(scores, layout, 0.25)
    assert plan.budgets == [int(408 * float(r)) for r in plan.ratios]
    assert [k.numel() for k in plan.kept] == plan.budgets
    assert all(int(k.max()) < 408 for k in plan.kept)


def test_thumbnail_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3] + [0.0] * 571)
    assert select_thumbnail(scores, 4 / 576).tolist() == [1, 3, 2, 4]  # descending score
    assert select_thumbnail(scores, 4 / 576, "spatial").tolist() == [1, 2, 3, 4]
    assert select_thumbnail(scores, 0.25).numel() == 144  # int(576 * 0.25)
    assert select_thumbnail(scores, 0.1).numel() == 57  # int(57.6)
    # in the segment: thumbnail first, no newline among its tokens
    layout = AnyResLayout(1, 2, 24, (336, 672))
    all_scores = torch.randn(3, 576, generator=torch.Generator().manual_seed(4))
    all_scores[0] = scores
    assert segment_sources(run(layout, all_scores, ratio=4 / 576))[:4] == [1, 3, 2, 4]
    assert segment_sources(run(layout, all_scores, ratio=4 / 576, thumbnail_order="spatial"))[:4] == [1, 2, 3, 4]


def _symmetric_scores(layout: AnyResLayout) -> torch.Tensor:
    """Thumbnail scores symmetric about the centre in x and y: every half of the map has the same
    sum, so on a 1x2 or 2x1 grid both crops get ratio_c = r."""
    scores = torch.randn(layout.num_tiles, 576, generator=torch.Generator().manual_seed(0))
    f = (torch.arange(24.0) - 11.5) ** 2 * 0.01
    scores[0] = (f[:, None] + f[None, :]).flatten()
    return scores


def test_authors_slot_layout_with_vertical_padding():
    # 1 x 2, W=176, H=55: each crop keeps rows [5, 19) = 14 x 24 = 336 tokens; at r = 1 with equal
    # region sums every crop token is kept. Token m goes to slot (m // 24, m % 24): the image rows
    # move up by 5, canvas rows 14..23 are empty and leave 10 bare newlines.
    layout = AnyResLayout(1, 2, 24, (55, 176))
    out = run(layout, _symmetric_scores(layout), ratio=1.0)
    crop_part = segment_sources(out)[576:]
    assert out.num_tokens == 576 + 2 * 336 + 24
    row = [576 + 5 * 24 + x for x in range(24)] + [2 * 576 + 5 * 24 + x for x in range(24)] + [-1]
    assert crop_part[:49] == row  # first slot row: image row 5 of crop 0, then of crop 1, newline
    assert crop_part[-11:] == [-1] * 11 and crop_part[-12] != -1  # row 13's newline + 10 bare rows
    assert out.num_newlines == 24 == crop_part.count(-1)
    # the spatial layout: transformers' box [4, 20) has 16 rows; rows 4 and 19 hold only a newline
    spatial = run(layout, _symmetric_scores(layout), ratio=1.0, layout="spatial")
    crop_part = segment_sources(spatial)[576:]
    assert spatial.num_newlines == 16 == crop_part.count(-1)
    assert crop_part[0] == -1 and crop_part[1:49] == row[:-1] and crop_part[-2:] == [-1, -1]


def test_authors_slot_layout_with_horizontal_padding():
    # 2 x 1, W=55, H=176: crops keep columns [5, 19), 24 x 14 = 336 tokens. Re-wrapped at width 24,
    # slot row 0 holds image row 0 (x 5..18) and the first 10 tokens of image row 1, with no newline.
    layout = AnyResLayout(2, 1, 24, (176, 55))
    out = run(layout, _symmetric_scores(layout), ratio=1.0)
    crop_part = segment_sources(out)[576:]
    assert crop_part[:24] == [576 + x for x in range(5, 19)] + [576 + 24 + x for x in range(5, 15)]
    assert crop_part[24] == -1
    # 336 tokens fill slot rows 0..13 of each crop; rows 14..23 of each crop block are bare newlines
    assert crop_part.count(-1) == 48 and crop_part[-10:] == [-1] * 10
    # spatial layout: true positions, one newline after each 14-token image row
    spatial = run(layout, _symmetric_scores(layout), ratio=1.0, layout="spatial")
    assert segment_sources(spatial)[576:576 + 15] == [576 + x for x in range(5, 19)] + [-1]


def test_authors_slot_layout_keeps_only_kept_slots():
    # 1 x 2 at 176 x 55, r = 0.5, symmetric sums -> each crop keeps int(336 * 0.5) = 168 tokens. A kept
    # token with valid index m sits at canvas slot (m // 24, 24 c + m % 24); reading the canvas row
    # by row gives, per slot row, crop 0's kept slots, crop 1's kept slots, a newline.
    layout = AnyResLayout(1, 2, 24, (55, 176))
    scores = _symmetric_scores(layout)
    plan = plan_crops(scores, layout, 0.5)
    assert plan.budgets == [168, 168]
    expected = []
    for slot_row in range(24):
        for c in range(2):
            for m in sorted(plan.kept[c].tolist()):
                if m // 24 == slot_row:
                    expected.append((1 + c) * 576 + (5 + m // 24) * 24 + m % 24)  # true source of token m
        expected.append(-1)
    assert segment_sources(run(layout, scores, ratio=0.5))[288:] == expected


def test_full_ratio_is_not_the_identity():
    assert get_compressor_class("globalcom2").identity_at_full_ratio is False
    # 640 x 480 on 2 x 2: the authors' layout has 48 newlines where vanilla has 36, and uneven region
    # sums leave below-average crops at ratio_c < 1.
    layout = AnyResLayout(2, 2, 24, (480, 640))
    scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(3))
    out = run(layout, scores, ratio=1.0)
    ratios = crop_ratios(region_sums(scores[0], 2, 2), 1.0)
    assert (ratios < 1).any() and (ratios <= 1).all()
    assert out.num_newlines == 48 != layout.valid_box("hf").height
    assert out.num_tokens < layout.vanilla_token_count() - 12


def test_empty_unpadded_box_emits_only_newlines():
    # W=3000, H=30 on 1 x 3: new_h = int(30 * 72 / 3000) = 0 -> no valid row (the authors'
    # interpolate would fail); every crop keeps nothing, the crop part is 24 newlines
    layout = AnyResLayout(1, 3, 24, (30, 3000))
    scores = torch.randn(4, 576, generator=torch.Generator().manual_seed(5))
    out = run(layout, scores, ratio=0.5)
    assert segment_sources(out)[288:] == [-1] * 24 and out.num_tokens == 288 + 24
    spatial = run(layout, scores, ratio=0.5, layout="spatial")
    assert spatial.num_tokens == 288 and spatial.num_newlines == 0


def test_one_by_one_grid():
    layout = AnyResLayout(1, 1, 24, (300, 500))  # W=500, H=300 on one crop: rows [5, 19)
    scores = torch.randn(2, 576, generator=torch.Generator().manual_seed(6))
    out = run(layout, scores, ratio=0.25)
    # one crop: p = 1 / (1 + 1e-8) and ratio = r (1 + p - p), which float rounding puts one ulp below
    # r: 14 * 24 = 336 valid tokens -> int(83.99999999999999) = 83 kept, as in the authors' code
    p = 1 / (1 + 1e-8)
    assert 0.25 * (1 + p - p) < 0.25 and int(336 * (0.25 * (1 + p - p))) == 83
    assert out.num_tokens == 144 + 83 + 24


@pytest.mark.parametrize("bad", [{"layout": "raster"}, {"thumbnail_order": "random"}, {"temperature": 0},
                                 {"temperature": "10"}, {"temperature": True}])
def test_bad_options(bad):
    with pytest.raises(ValueError) as err:
        build_compressor({"name": "globalcom2", **bad})
    message = str(err.value)
    key, value = next(iter(bad.items()))
    assert f"compressor.{key}" in message and repr(value) in message
    if key == "layout":
        assert "authors, spatial" in message
    if key == "thumbnail_order":
        assert "score, spatial" in message


def test_describe_and_defaults():
    gc = build_compressor({"name": "globalcom2"})
    assert gc.describe() == {"name": "globalcom2", "ratio": 0.25, "temperature": 10.0, "layout": "authors",
                             "thumbnail_order": "score"}
    assert gc.vision_signals == (SCORE_SIGNAL,) and SCORE_SIGNAL.layer == -1


# -- properties over grids and ratios ------------------------------------------------------------


def definition_count(layout: AnyResLayout, scores: torch.Tensor, ratio: float) -> tuple[int, list[int]]:
    """Token count and per-crop budgets, from the definition with plain Python arithmetic."""
    side, rows, cols = 24, layout.rows, layout.cols
    ph, pw = max(side // rows, 1), max(side // cols, 1)
    sums = [0.0] * (rows * cols)
    for idx, value in enumerate(scores[0].tolist()):
        y, x = divmod(idx, side)
        sums[min(y // ph, rows - 1) * cols + min(x // pw, cols - 1)] += value
    top = max(sums)
    exps = [math.exp((s - top) / 10.0) for s in sums]
    probs = [e / (sum(exps) + 1e-8) for e in exps]
    mean = sum(probs) / len(probs)
    ratios = [min(ratio * (1 + p - mean), 1.0) for p in probs]
    height, width = layout.image_hw
    canvas_h, canvas_w = 24 * rows, 24 * cols
    if width / height > canvas_w / canvas_h:
        pad = (canvas_h - int(height * (canvas_w / width))) // 2
        valid_rows, valid_cols = (pad, canvas_h - pad), (0, canvas_w)
    else:
        pad = (canvas_w - int(width * (canvas_h / height))) // 2
        valid_rows, valid_cols = (0, canvas_h), (pad, canvas_w - pad)
    budgets = []
    for c in range(rows * cols):
        i, j = divmod(c, cols)
        h = max(min(valid_rows[1], 24 * i + 24) - max(valid_rows[0], 24 * i), 0)
        w = max(min(valid_cols[1], 24 * j + 24) - max(valid_cols[0], 24 * j), 0)
        budgets.append(int(h * w * ratios[c]))
    return int(576 * ratio) + sum(budgets) + canvas_h, budgets


@pytest.mark.parametrize("layout", PROPERTY_LAYOUTS, ids=lambda l: f"{l.rows}x{l.cols}-{l.image_hw[0]}x{l.image_hw[1]}")
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25, 0.1])
def test_properties(layout, ratio):
    scores = torch.randn(layout.num_tiles, 576, generator=torch.Generator().manual_seed(7)) * 2
    inp = make_input(layout, scores)
    gc = build_compressor({"name": "globalcom2", "ratio": ratio})
    out = gc.compress_vision(inp)
    count, budgets = definition_count(layout, scores, ratio)
    assert out.num_tokens == count == globalcom2_token_count(inp, ratio) == gc.token_count(inp)
    sources = torch.tensor(segment_sources(out))
    k = int(576 * ratio)
    thumb = sources[:k]
    assert torch.equal(thumb, torch.argsort(scores[0], descending=True)[:k])
    crop_part = sources[k:]
    real = crop_part[crop_part >= 0]
    assert real.unique().numel() == real.numel()
    assert torch.bincount(real // 576 - 1, minlength=layout.num_crops).tolist() == budgets
    valid = layout.tile_valid_mask("llava").flatten()
    assert valid[real].all(), "a kept crop token lies in the padding"
    assert int((crop_part == -1).sum()) == 24 * layout.rows == out.num_newlines
    # the embeddings are the named sources' features
    assert torch.equal(out.embeds[out.provenance.token], inp.features.reshape(-1, 3)[out.provenance.source])
    # inside one crop, kept tokens appear in raster order (the slot quirk preserves relative order)
    for c in range(layout.num_crops):
        mine = real[real // 576 == c + 1]
        assert torch.equal(mine, mine.sort().values)
    # spatial layout: same tokens, true canvas order, vanilla newlines
    spatial_gc = build_compressor({"name": "globalcom2", "ratio": ratio, "layout": "spatial",
                                   "thumbnail_order": "spatial"})
    spatial = spatial_gc.compress_vision(inp)
    spatial_sources = torch.tensor(segment_sources(spatial))
    assert torch.equal(spatial_sources[:k], thumb.sort().values)
    spatial_real = spatial_sources[k:][spatial_sources[k:] >= 0]
    assert set(spatial_real.tolist()) == set(real.tolist())
    canvas_rank = torch.empty(layout.num_tiles * 576, dtype=torch.long)
    canvas_ids = layout.canvas_source_ids().flatten()
    canvas_rank[canvas_ids] = torch.arange(canvas_ids.numel())
    assert torch.equal(canvas_rank[spatial_real], canvas_rank[spatial_real].sort().values)
    assert spatial.num_newlines == layout.valid_box("hf").height == int((spatial_sources == -1).sum())
    assert spatial.num_tokens == count - 24 * layout.rows + layout.valid_box("hf").height == spatial_gc.token_count(inp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keeps_the_model_dtype(dtype):
    layout = AnyResLayout(2, 2, 24, (480, 640))
    scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(1)).to(dtype)
    inp = make_input(layout, scores)
    out = build_compressor({"name": "globalcom2"}).compress_vision(inp)
    assert out.embeds.dtype == dtype
    assert out.num_tokens == globalcom2_token_count(inp, 0.25)


# -- the authors' own outputs ----------------------------------------------------------------------


def test_matches_the_authors_code_exactly():
    """Outputs of the authors' functions (see tests/data/README.md) on 31 inputs x 5 ratios."""
    reference = torch.load(REFERENCE)
    assert len(reference["cases"]) == 155
    grids = {(x["rows"], x["cols"]) for x in reference["inputs"]}
    assert {(1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3)} <= grids
    for case in reference["cases"]:
        source = reference["inputs"][case["input"]]
        layout = AnyResLayout(source["rows"], source["cols"], 24, tuple(source["image_hw"]))
        scores, ratio = source["scores"], case["ratio"]
        label = (layout.rows, layout.cols, layout.image_hw, scores.dtype, ratio)
        out = run(layout, scores, ratio=ratio)
        plan = plan_crops(scores, layout, ratio)
        assert np.allclose(plan.ratios, case["crop_ratios"].numpy(), rtol=0, atol=1e-12), label
        assert np.array_equal(plan.ratios, case["crop_ratios"].numpy()), label  # in fact bit-identical
        assert torch.equal(select_thumbnail(scores[0], ratio), case["thumbnail"].long()), label
        assert out.num_tokens == case["num_tokens"], label
        assert segment_sources(out) == case["segment_sources"].tolist(), label


def test_end_to_end_on_the_tiny_model(tiny, images):
    gc = build_compressor({"name": "globalcom2", "ratio": 0.25})
    result = tiny.generate(images["2x2-padded"], "What color is the circle?", gc, max_new_tokens=2)
    prepared = tiny.prepare(images["2x2-padded"], "What color is the circle?", gc)
    assert result.visual_tokens_spliced == prepared.segment.num_tokens
    assert result.visual_tokens_after < 0.35 * result.visual_tokens_before
    assert int((prepared.input_ids == tiny.image_token_id).sum()) == prepared.segment.num_tokens
