"""GlobalCom2 against its definition (hand-computed cases), its properties, and the authors' own outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compressors import AnyResLayout, VisionInput, build_compressor
from compressors.globalcom2 import (
    SCORE_SIGNAL,
    crop_ratios,
    crop_valid_boxes,
    global_crop_scores,
    globalcom2_token_count,
    region_sums,
    select_crop_tokens,
    select_thumbnail,
)
from tests.conftest import PROPERTY_LAYOUTS

REFERENCE = Path(__file__).parent / "data" / "globalcom2_reference.pt"


def make_input(layout: AnyResLayout, scores: torch.Tensor, dim: int = 3) -> VisionInput:
    """Features that name their source (channel 0: tile, channel 1: patch) and one-head signals."""
    signal = torch.zeros(layout.num_tiles, 1, 1 + layout.tokens_per_tile, dtype=scores.dtype)
    signal[:, 0, 1:] = scores
    features = torch.zeros(layout.num_tiles, layout.tokens_per_tile, dim)
    features[:, :, 0] = torch.arange(layout.num_tiles)[:, None].float()
    features[:, :, 1] = torch.arange(layout.tokens_per_tile)[None, :].float()
    return VisionInput(features=features, layout=layout, newline=torch.tensor([-1.0, -1.0, 7.0]),
                       signals={SCORE_SIGNAL: signal})


def segment_sources(out) -> list[int]:
    sources = torch.full((out.num_tokens,), -1)
    sources[out.provenance.token] = out.provenance.source
    return sources.tolist()


# -- definitions, by hand ------------------------------------------------------------------------


def test_region_sums_by_hand():
    values = torch.arange(16.0)  # a 4 x 4 "thumbnail"
    # 2 x 2 grid: regions are 2 x 2 blocks
    assert region_sums(values, 2, 2).tolist() == [0 + 1 + 4 + 5, 2 + 3 + 6 + 7, 8 + 9 + 12 + 13, 10 + 11 + 14 + 15]
    # 3 rows x 1 col: region height 4 // 3 = 1, the last region takes rows 2 and 3
    assert region_sums(values, 3, 1).tolist() == [6, 22, 38 + 54]
    # sums, not means: a 2 x 1 split of 24 x 24 ones gives 288 per region
    assert region_sums(torch.ones(576), 2, 1).tolist() == [288, 288]


def test_crop_ratio_formula_by_hand():
    # sums [10 ln 3, 0], temperature 10: exp(shifted) = [1, 1/3] -> p = [3/4, 1/4] (up to the 1e-8)
    sums = np.array([10 * math.log(3), 0.0])
    ratios = crop_ratios(sums, 0.25, 10.0)
    assert ratios == pytest.approx([0.25 * (1 + 0.75 - 0.5), 0.25 * (1 + 0.25 - 0.5)], abs=1e-8)
    assert ratios.sum() == pytest.approx(2 * 0.25, abs=1e-12)  # sum = n r before clipping
    # r = 0.9: 0.9 * 1.25 = 1.125 is clipped to 1; the excess is not redistributed
    assert crop_ratios(sums, 0.9, 10.0) == pytest.approx([1.0, 0.9 * 0.75], abs=1e-8)
    # equal sums: every crop gets r exactly (p = 1/n, mean p = 1/n)
    assert crop_ratios(np.zeros(4), 0.1) == pytest.approx([0.1] * 4, abs=1e-12)
    # a higher temperature flattens the allocation
    assert np.ptp(crop_ratios(sums, 0.25, 100.0)) < np.ptp(ratios)


def test_unpad_split_by_hand():
    # W=1000, H=700 on 2 x 2 (48 x 48 tokens): new_h = int(700 * 0.048) = 33, pad 7 -> rows [7, 41)
    boxes = crop_valid_boxes(AnyResLayout(2, 2, 24, (700, 1000)))
    assert boxes == [(7, 0, 17, 24), (7, 0, 17, 24), (0, 0, 17, 24), (0, 0, 17, 24)]
    # W=176, H=55 on 1 x 2: LLaVA's int() gives 14 rows [5, 19); transformers' rounding would give 16
    assert crop_valid_boxes(AnyResLayout(1, 2, 24, (55, 176))) == [(5, 0, 14, 24), (5, 0, 14, 24)]
    # horizontal padding, 2 x 1 with W=55, H=176: columns [5, 19)
    assert crop_valid_boxes(AnyResLayout(2, 1, 24, (176, 55))) == [(0, 5, 24, 14), (0, 5, 24, 14)]


def test_global_scores_tile_the_resized_map():
    layout = AnyResLayout(2, 2, 24, (700, 1000))
    thumb = torch.randn(576)
    boxes = crop_valid_boxes(layout)
    pieces = global_crop_scores(thumb, layout, boxes)
    resized = torch.nn.functional.interpolate(thumb.view(1, 1, 24, 24), size=(34, 48), mode="bilinear",
                                              align_corners=False)[0, 0]
    assert [p.numel() for p in pieces] == [17 * 24] * 4
    assert torch.equal(pieces[0], resized[:17, :24].flatten())
    assert torch.equal(pieces[1], resized[:17, 24:].flatten())
    assert torch.equal(pieces[3], resized[17:, 24:].flatten())


def test_crop_topk_by_hand():
    # local [3, 4, 0] -> [.6, .8, 0]; global [0, 0, 5] -> [0, 0, 1]; combined [.6, .8, 1] -> top 2: {1, 2}
    kept = select_crop_tokens(torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 5.0]), 2)
    assert set(kept.tolist()) == {1, 2}
    # scale of either score does not matter, only its direction
    kept = select_crop_tokens(torch.tensor([300.0, 400.0, 0.0]), torch.tensor([0.0, 0.0, 0.05]), 2)
    assert set(kept.tolist()) == {1, 2}


def test_thumbnail_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3] + [0.0] * 571)
    assert select_thumbnail(scores, 4 / 576).tolist() == [1, 3, 2, 4]  # descending score
    assert select_thumbnail(scores, 4 / 576, "spatial").tolist() == [1, 2, 3, 4]
    assert select_thumbnail(scores, 0.25).numel() == 144  # int(576 * 0.25)


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
    out = build_compressor({"name": "globalcom2", "ratio": 1.0}).compress_vision(make_input(layout, _symmetric_scores(layout)))
    sources = segment_sources(out)
    crop_part = sources[576:]
    assert out.num_tokens == 576 + 2 * 336 + 24 == len(sources)
    row = [576 + (5 + 0) * 24 + x for x in range(24)] + [2 * 576 + 5 * 24 + x for x in range(24)] + [-1]
    assert crop_part[:49] == row  # first slot row: image row 5 of crop 0, then of crop 1, newline
    assert crop_part[-11:] == [-1] * 11 and crop_part[-12] != -1  # row 13's newline + 10 bare rows
    assert out.num_newlines == 24


def test_authors_slot_layout_with_horizontal_padding():
    # 2 x 1, W=55, H=176: crops keep columns [5, 19), 24 x 14 = 336 tokens. Re-wrapped at width 24,
    # slot row 0 holds image row 0 (x 5..18) and the first 10 tokens of image row 1, with no newline.
    layout = AnyResLayout(2, 1, 24, (176, 55))
    out = build_compressor({"name": "globalcom2", "ratio": 1.0}).compress_vision(make_input(layout, _symmetric_scores(layout)))
    crop_part = segment_sources(out)[576:]
    assert crop_part[:24] == [576 + x for x in range(5, 19)] + [576 + 24 + x for x in range(5, 15)]
    assert crop_part[24] == -1
    # spatial layout: true positions, one newline after each 14-token image row
    spatial = build_compressor({"name": "globalcom2", "ratio": 1.0, "layout": "spatial"}).compress_vision(
        make_input(layout, _symmetric_scores(layout)))
    assert segment_sources(spatial)[576:576 + 15] == [576 + x for x in range(5, 19)] + [-1]


def test_full_ratio_is_not_the_identity():
    # 640 x 480 on 2 x 2: authors' layout has 48 newlines where vanilla has 36, and uneven region
    # sums leave below-average crops at ratio_c < 1.
    layout = AnyResLayout(2, 2, 24, (480, 640))
    scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(3))
    inp = make_input(layout, scores)
    out = build_compressor({"name": "globalcom2", "ratio": 1.0}).compress_vision(inp)
    ratios = crop_ratios(region_sums(scores[0], 2, 2), 1.0)
    assert (ratios < 1).any() and (ratios <= 1).all()
    assert out.num_newlines == 48 != layout.valid_box("hf").height
    assert out.num_tokens != layout.vanilla_token_count()


@pytest.mark.parametrize("bad", [{"layout": "raster"}, {"thumbnail_order": "random"}, {"temperature": 0},
                                 {"temperature": "10"}])
def test_bad_options(bad):
    with pytest.raises(ValueError, match="compressor.(layout|thumbnail_order|temperature)"):
        build_compressor({"name": "globalcom2", **bad})


# -- properties over grids and ratios ------------------------------------------------------------


def _definition_count(layout: AnyResLayout, scores: torch.Tensor, ratio: float) -> tuple[int, list[int]]:
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
    out = build_compressor({"name": "globalcom2", "ratio": ratio}).compress_vision(inp)
    count, budgets = _definition_count(layout, scores, ratio)
    assert out.num_tokens == count == globalcom2_token_count(inp, ratio)
    sources = torch.tensor(segment_sources(out))
    k = int(576 * ratio)
    thumb = sources[:k]
    assert torch.equal(thumb, torch.argsort(scores[0], descending=True)[:k])
    crop_part = sources[k:]
    real = crop_part[crop_part >= 0]
    assert real.unique().numel() == real.numel()
    tiles = real // 576
    assert torch.bincount(tiles - 1, minlength=layout.num_crops).tolist() == budgets
    valid = layout.tile_valid_mask("llava").flatten()
    assert valid[real].all(), "a kept crop token lies in the padding"
    assert int((crop_part == -1).sum()) == 24 * layout.rows
    # spatial layout: same tokens, true canvas order, vanilla newlines
    spatial = build_compressor({"name": "globalcom2", "ratio": ratio, "layout": "spatial",
                                "thumbnail_order": "spatial"}).compress_vision(inp)
    spatial_sources = torch.tensor(segment_sources(spatial))
    assert torch.equal(spatial_sources[:k], thumb.sort().values)
    spatial_real = spatial_sources[k:][spatial_sources[k:] >= 0]
    assert set(spatial_real.tolist()) == set(real.tolist())
    canvas_rank = torch.empty(layout.num_tiles * 576, dtype=torch.long)
    canvas_ids = layout.canvas_source_ids().flatten()
    canvas_rank[canvas_ids] = torch.arange(canvas_ids.numel())
    assert torch.equal(canvas_rank[spatial_real], canvas_rank[spatial_real].sort().values)
    assert spatial.num_newlines == layout.valid_box("hf").height == int((spatial_sources == -1).sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keeps_the_model_dtype(dtype):
    layout = AnyResLayout(2, 2, 24, (480, 640))
    scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(1)).to(dtype)
    inp = make_input(layout, scores)
    inp.features = inp.features.to(dtype)
    inp.newline = inp.newline.to(dtype)
    out = build_compressor({"name": "globalcom2"}).compress_vision(inp)
    assert out.embeds.dtype == dtype
    assert out.num_tokens == globalcom2_token_count(inp, 0.25)


# -- the authors' own outputs ----------------------------------------------------------------------


def test_matches_the_authors_code_exactly():
    """Outputs of the authors' functions (see tests/data/README.md) on 23 inputs x 5 ratios."""
    reference = torch.load(REFERENCE)
    assert len(reference["cases"]) == 115
    for case in reference["cases"]:
        source = reference["inputs"][case["input"]]
        layout = AnyResLayout(source["rows"], source["cols"], 24, tuple(source["image_hw"]))
        scores = source["scores"]
        out = build_compressor({"name": "globalcom2", "ratio": case["ratio"]}).compress_vision(make_input(layout, scores))
        label = (layout.rows, layout.cols, layout.image_hw, case["ratio"])
        ratios = crop_ratios(region_sums(scores[0], layout.rows, layout.cols), case["ratio"])
        assert np.array_equal(ratios, case["crop_ratios"].numpy()), label
        assert torch.equal(select_thumbnail(scores[0], case["ratio"]), case["thumbnail"].long()), label
        assert out.num_tokens == case["num_tokens"], label
        assert segment_sources(out) == case["segment_sources"].tolist(), label


def test_end_to_end_on_the_tiny_model(tiny, images):
    gc = build_compressor({"name": "globalcom2", "ratio": 0.25})
    result = tiny.generate(images["2x2-padded"], "What color is the circle?", gc, max_new_tokens=2)
    prepared = tiny.prepare(images["2x2-padded"], "What color is the circle?", gc)
    assert result.visual_tokens_spliced == prepared.segment.num_tokens
    assert result.visual_tokens_after < 0.35 * result.visual_tokens_before
    assert int((prepared.input_ids == tiny.image_token_id).sum()) == prepared.segment.num_tokens
