"""The downsample baseline: resized image, smaller tiles, vanilla packing, counted from its definition."""

from __future__ import annotations

import pytest
import torch

from compressors import build_compressor
from compressors.downsample import downsampled_size
from tests.conftest import random_image

QUESTION = "What color is the circle?"


def test_transform_image_by_hand():
    image = random_image(480, 640)
    # ratio 0.25: s = round(24 * 0.5) = 12, half the resolution
    small, side = build_compressor({"name": "downsample", "ratio": 0.25}).transform_image(image, 24)
    assert side == 12 and small.size == (320, 240)
    # ratio 0.1: s = round(7.589) = 8, a third: 640 / 3 = 213.3 -> 213, 480 / 3 = 160
    small, side = build_compressor({"name": "downsample", "ratio": 0.1}).transform_image(image, 24)
    assert side == 8 and small.size == (213, 160)
    # ratio 1: nothing changes (the same object)
    same, side = build_compressor({"name": "downsample", "ratio": 1.0}).transform_image(image, 24)
    assert same is image and side == 24
    assert downsampled_size(3, 1000, 1, 24) == (1, 42)  # at least one pixel


def test_tokens_by_hand_on_the_tiny_model(tiny):
    """640 x 480 at ratio 0.25: a 320 x 240 image on 168-px tiles. Canvas pinpoints halve (672 -> 336), so
    the grid stays 2x2 of 12 x 12 tokens; unpadding (transformers' rule): 240 * 24 / 320 = 18 rows, padding
    3 -> 18 rows of 24 tokens + 18 newlines; with the 144 thumbnail tokens: 144 + 18 * 25 = 594."""
    image = random_image(480, 640)
    prepared = tiny.prepare(image, QUESTION, build_compressor({"name": "downsample", "ratio": 0.25}))
    layout = prepared.layout
    assert (layout.rows, layout.cols, layout.side, layout.image_hw) == (2, 2, 12, (240, 320))
    assert prepared.segment.num_tokens == 144 + 18 * 25 == 594
    assert prepared.segment.num_newlines == 18
    assert prepared.tokens_before == 576 + 36 * 49 == 2340  # vanilla's count for the original image
    assert int((prepared.input_ids == tiny.image_token_id).sum()) == 594


def test_tiles_are_the_towers_output_on_the_resized_image(tiny):
    """The segment's thumbnail tokens are transformers' own vision tower (interpolated position embeddings)
    on the processor's 168-px tiles of the resized image, projected."""
    image = random_image(480, 640)
    compressor = build_compressor({"name": "downsample", "ratio": 0.25})
    small, side = compressor.transform_image(image, 24)
    inputs = tiny.processor_inputs(small, QUESTION, side)
    pixel_values = inputs["pixel_values"][0, :5]
    assert pixel_values.shape == (5, 3, 168, 168)
    with torch.inference_mode():
        hidden = tiny.model.model.vision_tower(pixel_values, output_hidden_states=True,
                                               interpolate_pos_encoding=True).hidden_states[-2]
        expected = tiny.model.model.multi_modal_projector(hidden[:, 1:])  # [5, 144, D]
        segment = tiny.prepare(image, QUESTION, compressor).segment
    assert torch.allclose(segment.embeds[:144], expected[0], atol=1e-5)


@pytest.mark.parametrize("bad", [{"budget": {"scope": "per_view", "count_newlines": True}}, {"ratio": 0}])
def test_bad_options(bad):
    with pytest.raises(ValueError, match=r"compressor\.(budget|ratio)"):
        build_compressor({"name": "downsample", **bad})
