"""HiRED against the authors' own outputs, hand-computed budgets, and the row-band vs 2-D allocation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressors import AnyResLayout, ClsAttention, VisionInput, build_compressor
from compressors.hired import (
    cls_attention_scores,
    crop_budgets,
    crop_shares,
    hired_keep_mask,
    hired_sources,
    image_budgets,
)

REFERENCE = Path(__file__).parent / "data" / "hired_reference.pt"


def quadrant_map(rows: range, cols: range) -> torch.Tensor:
    """A 24 x 24 content map, 1 on ``rows x cols`` and 0 elsewhere, flattened."""
    grid = torch.zeros(24, 24)
    grid[rows.start:rows.stop, cols.start:cols.stop] = 1.0
    return grid.flatten()


def test_matches_the_authors_code_exactly():
    """``HiRED_token_selection`` + ``pack_HiRED_image_features`` on 12 inputs x 4 ratios x 1-3 alphas
    (tests/data/README.md): the same kept tokens in every view and the same segment, token for token."""
    reference = torch.load(REFERENCE)
    assert len(reference["cases"]) == 80
    grids = {(x["rows"], x["cols"]) for x in reference["inputs"]}
    assert {(2, 2), (1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 3)} <= grids
    for case in reference["cases"]:
        source = reference["inputs"][case["input"]]
        layout = AnyResLayout(source["rows"], source["cols"], 24, tuple(source["image_hw"]))
        content = source["content"][:, :, 1:].sum(dim=1).expand(layout.num_tiles, -1)  # the thumbnail row is used
        importance = source["importance"][:, :, 1:].sum(dim=1)  # [V, 576], heads summed as theirs
        keep = hired_keep_mask(content, importance, layout, case["ratio"], case["alpha"], "authors")
        label = (source["image_hw"], case["ratio"], case["alpha"])
        for view, kept in enumerate(case["kept"]):
            assert torch.equal(keep[view].nonzero().flatten(), kept.long()), (label, view)
        assert torch.equal(hired_sources(keep, layout), case["segment_sources"].long()), label
        assert case["num_tokens"] <= int(layout.num_tiles * 576 * case["ratio"])


def test_budgets_by_hand():
    # 2x2 (V = 5), rho = 0.2, alpha = 0.5: B = int(576.0) = 576, thumbnail 288, crops 288
    assert image_budgets(5, 576, 0.2, 0.5) == (576, 288, 288)
    # 1x2 (V = 3), rho = 0.1: B = int(172.8) = 172, thumbnail int(86.0) = 86, crops 86
    assert image_budgets(3, 576, 0.1, 0.5) == (172, 86, 86)
    # alpha 0.8 on 1x3 (V = 4), rho = 0.5: B = 1152, thumbnail min(921, 576) = 576, crops 576
    assert image_budgets(4, 576, 0.5, 0.8) == (1152, 576, 576)
    # float32 shares: 1/3 -> 0.33333334, x 100 = 33.333336 -> 33 each; floors leave 1 token unused
    assert crop_budgets(torch.tensor([1, 1, 1]), 100, 576).tolist() == [33, 33, 33]
    # a crop's budget never exceeds its 576 tokens; the excess is not redistributed
    assert crop_budgets(torch.tensor([3, 1]), 1000, 576).tolist() == [576, 250]


def test_row_bands_vs_two_d_regions():
    """peer_methods.md §3.4/§11: a salient top-left quadrant on 2x2 gives [b, b, 0, 0] by the authors'
    row bands and [B_sub, 0, 0, 0] by 2-D regions; a salient left half on 1x2 splits evenly in bands."""
    layout = AnyResLayout(2, 2, 24, (672, 672))
    content = quadrant_map(range(0, 12), range(0, 12))  # the 144 tokens of the top-left quadrant
    # alpha 0.75: S = the top int(576 * 0.25) = 144 content tokens = exactly the quadrant
    assert crop_shares(content, layout, 0.75, "authors").tolist() == [72, 72, 0, 0]  # rows 0-5 and 6-11
    assert crop_shares(content, layout, 0.75, "paper").tolist() == [144, 0, 0, 0]
    _, _, sub = image_budgets(5, 576, 0.2, 0.75)  # B = 576, thumbnail 432, crops 144
    assert crop_budgets(torch.tensor([72, 72, 0, 0]), sub, 576).tolist() == [72, 72, 0, 0]
    importance = torch.rand(5, 576, generator=torch.Generator().manual_seed(0))
    for variant, expected in (("authors", [432, 72, 72, 0, 0]), ("paper", [432, 144, 0, 0, 0])):
        keep = hired_keep_mask(content.expand(5, -1), importance, layout, 0.2, 0.75, variant)
        assert keep.sum(dim=1).tolist() == expected
        assert int(keep.sum()) <= int(5 * 576 * 0.2)
    left = AnyResLayout(1, 2, 24, (336, 672))
    content = quadrant_map(range(0, 24), range(0, 12))  # left half: 288 tokens = int(576 * (1 - 0.5))
    assert crop_shares(content, left, 0.5, "authors").tolist() == [144, 144]  # top and bottom bands
    assert crop_shares(content, left, 0.5, "paper").tolist() == [288, 0]


def test_packing_is_raster_without_newlines_and_drops_padding():
    # 640 x 480 on 2x2: LLaVA's int() box keeps canvas rows [6, 42); tokens kept in the padding are dropped
    layout = AnyResLayout(2, 2, 24, (480, 640))
    keep = torch.zeros(5, 576, dtype=torch.bool)
    keep[0, [5, 3]] = True  # thumbnail, raster order
    keep[1, 0] = True  # crop 0, row 0: padding
    keep[1, 6 * 24 + 23] = True  # crop 0 row 6, x 23: canvas (6, 23)
    keep[2, 6 * 24 + 0] = True  # crop 1 row 6, x 0: canvas (6, 24), right after (6, 23)
    keep[3, 23 * 24 + 5] = True  # crop 2 row 23 = canvas row 47: padding
    keep[3, 0] = True  # crop 2 row 0 = canvas row 24
    assert hired_sources(keep, layout).tolist() == [3, 5, 576 + 6 * 24 + 23, 2 * 576 + 6 * 24, 3 * 576]


def test_full_ratio_keeps_every_unpadded_token_without_newlines():
    layout = AnyResLayout(2, 2, 24, (480, 640))
    hired = build_compressor({"name": "hired", "ratio": 1.0})
    gen = torch.Generator().manual_seed(3)
    signals = {ClsAttention(0): torch.randn(5, 2, 577, generator=gen), ClsAttention(-2): torch.randn(5, 2, 577, generator=gen)}
    out = hired.compress_vision(VisionInput(features=torch.randn(5, 576, 4, generator=gen), layout=layout,
                                            newline=torch.zeros(4), signals=signals))
    assert out.num_newlines == 0
    assert out.num_tokens == 576 + 36 * 48 == layout.vanilla_token_count() - 36  # vanilla minus its 36 newlines


def test_scores_are_post_softmax_sums_over_heads():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 1.0]]])  # [1 view, 2 heads, 1 + 3 keys]
    # head 0: uniform, 1/4 per key; head 1: e / (e^3 + 3e) = 1 / (e^2 + 3) per patch; [CLS] key dropped
    expected = torch.full((1, 3), 0.25 + 1 / (torch.tensor(2.0).exp() + 3))
    assert torch.allclose(cls_attention_scores(logits), expected)


@pytest.mark.parametrize("bad", [{"alpha": 1.0}, {"alpha": -0.1}, {"alpha": "0.5"}, {"variant": "rows"},
                                 {"content_layer": "0"}, {"importance_layer": 1.5}])
def test_bad_options(bad):
    with pytest.raises(ValueError) as err:
        build_compressor({"name": "hired", **bad})
    key, value = next(iter(bad.items()))
    assert f"compressor.{key}" in str(err.value) and repr(value) in str(err.value)
    if key == "variant":
        assert "authors, paper" in str(err.value)


def test_defaults_and_signals():
    hired = build_compressor({"name": "hired"})
    assert hired.describe() == {"name": "hired", "ratio": 0.2, "budget": {"scope": "global", "count_newlines": False},
                                "alpha": 0.5, "variant": "authors", "content_layer": 0, "importance_layer": -2}
    assert hired.vision_signals == (ClsAttention(0), ClsAttention(-2))
    assert build_compressor({"name": "hired", "content_layer": -2}).vision_signals == (ClsAttention(-2),)
