"""VisionZip against the authors' own outputs, a hand-computed merge, its NeXT layout and counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressors import AnyResLayout, ClsAttention, LayerKeys, VisionInput, build_compressor
from compressors.visionzip import segment_rows, split_budget, zip_views

REFERENCE = Path(__file__).parent / "data" / "visionzip_reference.pt"


def test_matches_the_authors_code_exactly():
    """``CLIPVisionTower_VisionZip.forward`` + ``prepare_inputs_labels_for_multimodal_visionzip`` on 6 grids
    x 5-6 (D, C) settings: the image segment is bit-identical."""
    reference = torch.load(REFERENCE)
    assert len(reference["cases"]) == 31
    assert {(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)} <= {(x["rows"], x["cols"]) for x in reference["inputs"]}
    for case in reference["cases"]:
        source = reference["inputs"][case["input"]]
        layout = AnyResLayout(source["rows"], source["cols"], 24, tuple(source["image_hw"]))
        metric = source["keys"].mean(dim=2)  # LayerKeys [V, L, heads, d] -> head mean
        zipped = zip_views(source["hidden"], source["attention"], metric, case["dominant"], case["contextual"])
        rows = segment_rows(zipped, layout, case["dominant"])
        segment = zipped["tokens"].reshape(-1, source["hidden"].shape[-1])[rows]
        assert torch.equal(segment, case["segment"]), (source["image_hw"], case["dominant"], case["contextual"])
        assert segment.shape[0] == layout.num_tiles * (case["dominant"] + case["contextual"])


def test_compressor_on_the_authors_inputs():
    """The registered compressor (signals in, projector applied) gives the authors' segment on a padded 2x2."""
    reference = torch.load(REFERENCE)
    source = reference["inputs"][1]
    case = next(c for c in reference["cases"] if c["input"] == 1 and c["dominant"] == 54)
    layout = AnyResLayout(source["rows"], source["cols"], 24, tuple(source["image_hw"]))
    inp = VisionInput(features=None, layout=layout, newline=torch.zeros(3),
                      signals={ClsAttention(-2): source["attention"].log(), LayerKeys(-2): source["keys"]},
                      vision_features=source["hidden"], projector=torch.nn.Identity())
    out = build_compressor({"name": "visionzip", "ratio": 64 / 576}).compress_vision(inp)
    assert torch.allclose(out.embeds, case["segment"], atol=1e-6)
    assert out.provenance.token[0] == 0 and out.provenance.source[0] == layout.cls_source_id(0)  # [CLS] first


def test_merge_by_hand():
    # one view: [CLS] + 6 patches; D = 2 ([CLS] + top patch), C = 2
    attention = torch.tensor([[[0.1, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1]]])  # token 4 (patch 3) dominates
    hidden = torch.arange(7.0)[:, None] * torch.tensor([1.0, 10.0])  # h_t = [t, 10 t]
    metric = torch.tensor([[0.0, 0.0], [1, 0], [1, 0.1], [0, 1], [5, 5], [0.1, 1], [0.2, 1]])[None]
    zipped = zip_views(hidden[None], attention, metric, dominant=2, contextual=2)
    # candidates 1, 2, 3, 5, 6 (R = 5); step 5 // 2 = 2 -> targets: candidates 0 and 2 = tokens 1 and 3;
    # token 2 joins token 1, tokens 5 and 6 join token 3 (cosine of the keys)
    assert zipped["chosen"].tolist() == [[0, 4]] and zipped["targets"].tolist() == [[1, 3]]
    assert zipped["members"].tolist() == [[2, 5, 6]] and zipped["assign"].tolist() == [[0, 1, 1]]
    expected = [[0, 0], [4, 40],  # [CLS], dominant patch
                [1 + 2, 10 + 20],  # target 1 + mean(h_2)
                [3 + 5.5, 30 + 55]]  # target 3 + mean(h_5, h_6): the target plus the MEAN, not a mean with it
    assert zipped["tokens"][0].tolist() == expected
    # a target nobody joins stays itself (+ 0): step 5 // 3 = 1 -> targets tokens 1, 2, 3 with keys (1, 0),
    # (0, 1), (-1, 0); tokens 5 (1, .05) and 6 (2, -.1) both join token 1
    metric = torch.tensor([[0.0, 0.0], [1, 0], [0, 1], [-1, 0], [5, 5], [1, 0.05], [2, -0.1]])[None]
    zipped = zip_views(hidden[None], attention, metric, dominant=2, contextual=3)
    assert zipped["targets"].tolist() == [[1, 2, 3]] and zipped["assign"].tolist() == [[0, 0]]
    assert zipped["tokens"][0, 2:].tolist() == [[1 + 5.5, 10 + 55], [2, 20], [3, 30]]


def test_next_layout_by_hand():
    # 1x2 grid of 2 x 2-token tiles: each view keeps [CLS] + 1 dominant patch + 1 contextual token
    layout = AnyResLayout(1, 2, 2, (2, 4))
    attention = torch.full((3, 1, 5), 0.1)
    attention[0, 0, 2] = attention[1, 0, 3] = attention[2, 0, 2] = 1.0  # thumbnail patch 1, crop 1 patch 2, crop 2 patch 1
    hidden = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0))
    zipped = zip_views(hidden, attention, torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1)), 2, 1)
    rows = segment_rows(zipped, layout, dominant=2).tolist()
    # crop 1's patch 2 is canvas (1, 0), crop 2's patch 1 is canvas (0, 3): crop 2's comes first
    assert rows == [0, 1, 2,  # thumbnail: [CLS], dominant, contextual
                    7, 4,  # crop dominant patches in canvas raster order (rows are view * 3 + index)
                    3, 6,  # crop [CLS] tokens
                    5, 8]  # crop contextual tokens, crop by crop


def test_split_budget():
    # README: dominant 54 + contextual 10 = 64; the paper's 128 = 108 + 20 and 192 = 162 + 30
    assert split_budget(576, 64 / 576, 10 / 64) == (54, 10)
    assert split_budget(576, 128 / 576, 10 / 64) == (108, 20)
    assert split_budget(576, 192 / 576, 10 / 64) == (162, 30)
    assert split_budget(576, 0.25, 10 / 64) == (121, 23)  # T = 144, C = floor(22.5 + 0.5)
    assert split_budget(576, 0.1, 10 / 64) == (49, 9)  # T = floor(57.6 + 0.5) = 58, C = floor(9.0625 + 0.5)
    assert split_budget(576, 2 / 576, 10 / 64) == (1, 1)  # at least one contextual token, [CLS] dominant
    with pytest.raises(ValueError, match="at least 2 tokens per view"):
        split_budget(576, 1 / 576, 10 / 64)
    with pytest.raises(ValueError, match="at least 2 tokens per view"):
        build_compressor({"name": "visionzip", "ratio": 0.001})


@pytest.mark.parametrize("bad", [{"contextual_share": 0.0}, {"contextual_share": 1.0}, {"contextual_share": "0.2"},
                                 {"layer": "x"}])
def test_bad_options(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=rf"compressor\.{key} .*{value!r}"):
        build_compressor({"name": "visionzip", **bad})


def test_needs_the_vision_features():
    layout = AnyResLayout(1, 2, 24, (336, 672))
    inp = VisionInput(features=torch.zeros(3, 576, 2), layout=layout, newline=torch.zeros(2),
                      signals={ClsAttention(-2): torch.zeros(3, 1, 577), LayerKeys(-2): torch.zeros(3, 577, 1, 2)})
    with pytest.raises(ValueError, match="vision_features is required"):
        build_compressor({"name": "visionzip"}).compress_vision(inp)
