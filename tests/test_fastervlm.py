"""FasterVLM against the authors' own outputs and its definition (T per view, forced spatial layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressors import AnyResLayout, ClsAttention, VisionInput, build_compressor
from compressors.fastervlm import mean_cls_attention, spatial_layout_sources, tokens_per_view

REFERENCE = Path(__file__).parent / "data" / "fastervlm_reference.pt"


def test_matches_the_authors_code_exactly():
    """``encode_images`` + ``prepare_inputs_labels_for_multimodal`` on 8 images x 5 values of T."""
    reference = torch.load(REFERENCE)
    assert len(reference["cases"]) == 40
    assert {(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)} <= {(x["rows"], x["cols"]) for x in reference["inputs"]}
    for case in reference["cases"]:
        source = reference["inputs"][case["input"]]
        layout = AnyResLayout(source["rows"], source["cols"], 24, tuple(source["image_hw"]))
        fastervlm = build_compressor({"name": "fastervlm", "ratio": case["tokens_per_view"] / 576})
        keep = fastervlm.keep_mask(source["attention"][:, :, 1:].mean(dim=1))  # their head mean of the [CLS] row
        sources = spatial_layout_sources(keep, layout)
        assert torch.equal(sources, case["segment_sources"].long()), (source["image_hw"], case["tokens_per_view"])
        assert sources.numel() == layout.num_tiles * case["tokens_per_view"]


def test_tokens_per_view_follows_the_readme_settings():
    # README: T = 144 / 58 / 29 for 75 / 90 / 95 % reduction of 576
    assert [tokens_per_view(576, r) for r in (0.25, 0.1, 0.05)] == [144, 58, 29]
    assert tokens_per_view(576, 1.0) == 576 and tokens_per_view(576, 1e-6) == 1
    assert tokens_per_view(576, 0.5 / 576) == 1  # 0.5 rounds up


def test_layout_by_hand():
    # 1x2 at 400 x 800 (padded rows): thumbnail raster, then the padded canvas row by row across crops
    layout = AnyResLayout(1, 2, 24, (400, 800))
    keep = torch.zeros(3, 576, dtype=torch.bool)
    keep[0, [7, 2]] = True
    keep[1, [0, 23, 24]] = True  # crop 0: (0, 0) padding (kept: no unpad), (0, 23), (1, 0)
    keep[2, [0, 1]] = True  # crop 1: (0, 0) -> canvas (0, 24), (0, 1) -> canvas (0, 25)
    expected = [2, 7, 576, 576 + 23, 2 * 576, 2 * 576 + 1, 576 + 24]
    assert spatial_layout_sources(keep, layout).tolist() == expected


def test_scores_and_selection_by_hand():
    logits = torch.zeros(2, 2, 577)  # 2 views, 2 heads
    logits[0, 0, 5] = 4.0  # view 0: patch 4 (key 5) gets the most attention
    logits[0, 1, 9] = 2.0  # and patch 8 the second most
    logits[1, :, 1] = 1.0  # view 1: patch 0
    scores = mean_cls_attention(logits)
    assert scores.shape == (2, 576)
    assert torch.allclose(scores.sum(dim=1), 1 - logits.softmax(-1)[:, :, 0].mean(dim=1))  # [CLS] key dropped
    keep = build_compressor({"name": "fastervlm", "ratio": 2 / 576}).keep_mask(scores)
    assert keep[0].nonzero().flatten().tolist() == [4, 8] and keep[1].sum() == 2 and keep[1, 0]


def test_full_ratio_keeps_the_padding_and_no_newline():
    layout = AnyResLayout(2, 2, 24, (480, 640))
    gen = torch.Generator().manual_seed(0)
    inp = VisionInput(features=torch.randn(5, 576, 4, generator=gen), layout=layout, newline=torch.zeros(4),
                      signals={ClsAttention(-2): torch.randn(5, 3, 577, generator=gen)})
    out = build_compressor({"name": "fastervlm", "ratio": 1.0}).compress_vision(inp)
    assert out.num_tokens == 5 * 576 != layout.vanilla_token_count() and out.num_newlines == 0


@pytest.mark.parametrize("bad", [{"layer": "x"}, {"layer": 1.5}, {"budget": {"scope": "global", "count_newlines": False}}])
def test_bad_options(bad):
    with pytest.raises(ValueError, match=r"compressor\.(layer|budget)"):
        build_compressor({"name": "fastervlm", **bad})
