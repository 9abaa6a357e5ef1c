"""AnyRes geometry and vanilla packing, checked against transformers' own implementation."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from compressors import AnyResLayout, layout_for_image
from compressors.geometry import NEWLINE_SOURCE
from compressors.packing import pack_spatial, spatial_source_order
from models.tiny import GRID_PINPOINTS

SIZES = [(h, w) for h, w in itertools.product([90, 213, 336, 400, 480, 599, 700, 1000, 1400], repeat=2)]


@pytest.mark.parametrize("hw", SIZES)
def test_valid_box_matches_transformers_unpad(hw):
    layout = layout_for_image(hw, GRID_PINPOINTS)
    canvas = torch.arange(layout.canvas_hw[0] * layout.canvas_hw[1]).view(1, *layout.canvas_hw)
    expected = unpad_image(canvas, hw)[0]
    box = layout.valid_box("hf")
    assert torch.equal(canvas[0, box.top:box.bottom, box.left:box.right], expected)


@pytest.mark.parametrize("hw", SIZES)
def test_grid_matches_transformers(hw):
    layout = layout_for_image(hw, GRID_PINPOINTS)
    assert (layout.rows, layout.cols) == tuple(get_anyres_image_grid_shape(hw, GRID_PINPOINTS, 336))
    assert layout.side == 24


def test_llava_and_hf_unpad_rules_differ_where_rounding_matters():
    # 2x2 canvas (48 x 48 tokens), image W=1000, H=700: new_h = 700 * (48/1000) = 33.6 -> 33 either way,
    # pad = (48 - 33) // 2 = 7, rows [7, 41): 34 rows (one more than new_h because 48 - 33 is odd).
    layout = AnyResLayout(2, 2, 24, (700, 1000))
    for rule in ("hf", "llava"):
        box = layout.valid_box(rule)
        assert (box.top, box.bottom, box.left, box.right) == (7, 41, 0, 48)
    # H=55, W=176 on a 1x2 canvas (24 x 48 tokens): 55 * (48/176) = 14.999999999999998 in floats.
    # transformers rounds to 15 -> pad (24-15)//2 = 4, rows [4, 20); LLaVA truncates to 14 -> pad 5, rows [5, 19).
    assert 55 * (48 / 176) < 15
    layout = AnyResLayout(1, 2, 24, (55, 176))
    assert (layout.valid_box("hf").top, layout.valid_box("hf").bottom) == (4, 20)
    assert (layout.valid_box("llava").top, layout.valid_box("llava").bottom) == (5, 19)


def test_bad_rounding_and_layout_values():
    layout = AnyResLayout(1, 2, 24, (10, 20))
    with pytest.raises(ValueError, match="allowed: hf, llava"):
        layout.valid_box("banker")
    with pytest.raises(ValueError, match="rows, cols, side >= 1"):
        AnyResLayout(0, 2, 24, (10, 20))


def test_canvas_source_ids_and_valid_mask():
    layout = AnyResLayout(2, 2, 24, (480, 640))
    ids = layout.canvas_source_ids()
    assert ids[0, 0] == 1 * 576  # crop 0, patch 0
    assert ids[0, 24] == 2 * 576  # crop 1 starts at column 24
    assert ids[24, 0] == 3 * 576  # crop 2 starts at row 24
    assert ids[47, 47] == 4 * 576 + 575
    box = layout.valid_box("hf")
    valid = layout.tile_valid_mask("hf")
    assert valid.shape == (5, 576) and valid[0].all()
    assert int(valid[1:].sum()) == box.height * box.width
    inside = set(ids[box.top:box.bottom, box.left:box.right].flatten().tolist())
    assert inside == set((valid.flatten().nonzero().flatten() + 0).tolist()) - set(range(576))


def test_processor_placeholder_count_equals_vanilla_count(tiny, images):
    for image in images.values():
        inputs = tiny.processor_inputs(image, "q")
        layout = layout_for_image(tuple(inputs["image_sizes"][0].tolist()), GRID_PINPOINTS)
        count = int((inputs["input_ids"] == tiny.image_token_id).sum())
        assert count == layout.vanilla_token_count()
        assert len(spatial_source_order(layout)) == count


def test_pack_spatial_equals_transformers_pack_image_features(tiny):
    model = tiny.model
    dim = model.config.text_config.hidden_size
    for hw in [(672, 672), (480, 640), (400, 800), (800, 400), (300, 1000), (1000, 300), (336, 336), (123, 999)]:
        layout = layout_for_image(hw, GRID_PINPOINTS)
        features = torch.randn(layout.num_tiles, 576, dim)
        newline = model.model.image_newline.detach()
        expected, _ = model.model.pack_image_features([features], torch.tensor([hw]), "default", newline)
        packed = pack_spatial(features, layout, newline)
        assert torch.equal(packed.embeds, expected[0])
        assert packed.num_newlines == layout.valid_box().height
        sources = torch.full((packed.num_tokens,), NEWLINE_SOURCE)
        sources[packed.provenance.token] = packed.provenance.source
        assert torch.equal(sources, spatial_source_order(layout))


def test_pack_spatial_keep_mask_keeps_row_newlines():
    layout = AnyResLayout(1, 2, 24, (400, 800))
    features = torch.randn(3, 576, 4)
    keep = torch.zeros(3, 576, dtype=torch.bool)
    keep[0, 5] = keep[1, 0] = keep[2, 575] = True
    packed = pack_spatial(features, layout, torch.zeros(4), keep=keep)
    box = layout.valid_box()
    assert packed.num_tokens == 3 + box.height
    assert packed.provenance.source.tolist() == [5, 576, 2 * 576 + 575]
    # the thumbnail token first, then crop 0's first token in row 0, crop 1's last token in the last row
    assert packed.provenance.token.tolist() == [0, 1, 1 + box.height]
