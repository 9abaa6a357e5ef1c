"""The vision-stage peers in the pipeline: their signals, the fixed-size input mode, CLIP-space projection."""

from __future__ import annotations

import pytest
import torch

from compressors import LayerKeys, Provenance, build_compressor
from compressors.visionzip import split_budget
from models import build_pipeline
from models.cost import CostConvention, CostModel, counted_flops
from models.image_input import check_image_size
from models.vision import encode_vision
from tests.conftest import random_image

QUESTION = "What color is the circle?"
PEERS = ["hired", "fastervlm", "visionzip", "prumerge_plus", "downsample"]


def test_layer_keys_are_the_layers_own_keys(tiny, images):
    """``LayerKeys(l)`` equals what layer l's ``k_proj`` outputs in the tower's own (SDPA) forward."""
    tiles = tiny.processor_inputs(images["1x2"], QUESTION)["pixel_values"][0, :3]
    layers = tiny.model.model.vision_tower.encoder.layers
    captured = {}
    hooks = [layers[i].self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: captured.setdefault(i, out))
             for i in (1, 2)]
    with torch.inference_mode():
        tiny.model.model.vision_tower(tiles)
        _, signals = encode_vision(tiny.model, tiles, [LayerKeys(-1), LayerKeys(-2)])
    for hook in hooks:
        hook.remove()
    heads = tiny.model.config.vision_config.num_attention_heads
    for request, index in ((LayerKeys(-1), 2), (LayerKeys(-2), 1)):
        value = signals[request]
        assert value.shape == (3, 577, heads, 64 // heads)
        assert torch.allclose(value.flatten(2), captured[index], atol=1e-6)


@pytest.mark.parametrize("name", PEERS)
def test_each_peer_runs_in_the_pipeline(tiny, images, name):
    """Signals arrive and the segment is spliced; no method runs the last CLIP layer, and the CLIP-space
    mergers project only their own output tokens."""
    calls, projected = [], []
    model = tiny.model.model
    hooks = [model.vision_tower.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1)),
             model.multi_modal_projector.register_forward_hook(lambda m, args, out: projected.append(args[0].shape))]
    try:
        compressor = build_compressor({"name": name})
        prepared = tiny.prepare(images["1x2"], QUESTION, compressor)
    finally:
        for hook in hooks:
            hook.remove()
    segment = prepared.segment
    assert calls == [], f"{name} ran the last CLIP layer"
    assert 0 < segment.num_tokens < prepared.tokens_before == 576 + 24 * 49
    assert int((prepared.input_ids == tiny.image_token_id).sum()) == segment.num_tokens
    assert torch.isfinite(segment.embeds).all()
    if compressor.uses_projected_features:
        assert projected == [torch.Size([prepared.layout.num_tiles, prepared.layout.tokens_per_tile, 64])]
    else:  # one projection of exactly the emitted tokens
        assert projected == [torch.Size([segment.num_tokens, 64])]
        assert segment.provenance.space == "vision"


def test_a_clip_space_merger_generates(tiny, images):
    result = tiny.generate(images["1x2"], QUESTION, build_compressor({"name": "visionzip"}), max_new_tokens=2)
    assert result.new_tokens == 2 and result.visual_tokens_spliced == result.visual_tokens_after == 3 * 64
    assert result.provenance.weight is not None and result.provenance.space == "vision"


def test_fixed_size_mode_gives_the_papers_2x2_grid(tiny):
    """``model.image_size=672``: every image becomes 672 x 672, the 2x2 grid, 2,928 vanilla tokens (2,880
    without newlines); FasterVLM then keeps 5 T and VisionZip 5 (D + C), whatever the original aspect."""
    fixed = type(tiny)(tiny.model, tiny.processor, image_size=672)
    prepared = fixed.prepare(random_image(400, 800), QUESTION, build_compressor({"name": "fastervlm"}))
    assert (prepared.layout.rows, prepared.layout.cols, prepared.layout.image_hw) == (2, 2, (672, 672))
    assert prepared.tokens_before == 2928 and prepared.segment.num_tokens == 5 * 144
    prepared = fixed.prepare(random_image(1000, 300), QUESTION, build_compressor({"name": "visionzip", "ratio": 128 / 576}))
    assert prepared.layout.image_hw == (672, 672) and prepared.tokens_before == 2928
    assert prepared.segment.num_tokens == 640  # the paper's "640 tokens" on LLaVA-NeXT
    native = tiny.layout_of((300, 1000))  # without the mode: the 1x3 grid
    assert (native.rows, native.cols) == (1, 3) and native.vanilla_token_count() != 2928


def test_image_size_setting(compose_cfg):
    cfg = compose_cfg(["model.image_size=672"])
    assert cfg.model.image_size == 672 and compose_cfg().model.image_size is None
    for bad in (0, -672, 672.0, "672", True):
        with pytest.raises(ValueError, match=rf"model.image_size must be null .*got {bad!r}"):
            check_image_size(bad)
    assert build_pipeline({"loader": "tiny", "name": "tiny", "image_size": 672, "text_layers": 1}).image_size == 672


def test_provenance_select_keeps_weights_aligned():
    provenance = Provenance(token=torch.tensor([0, 1, 1, 2]), source=torch.tensor([5, 6, 7, 8]),
                            weight=torch.tensor([1.0, 0.5, 0.25, 2.0]), space="vision")
    kept = provenance.select(torch.tensor([1, 2]), length=3)
    assert kept.token.tolist() == [0, 0, 1] and kept.source.tolist() == [6, 7, 8]
    assert kept.weight.tolist() == [0.5, 0.25, 2.0] and kept.space == "vision"
    with pytest.raises(ValueError, match="provenance space must be one of projected, vision; got 'clip'"):
        Provenance(token=torch.tensor([0]), source=torch.tensor([0]), space="clip")


@pytest.mark.parametrize("name", PEERS)
def test_cost_model_counts_the_vision_side_as_it_runs(tiny, name):
    """``FlopCounterMode`` over a real ``generate`` (one token) against the analytic vision figure:
    signals (``ClsAttention``, ``LayerKeys``), smaller tiles (downsample) and CLIP-space mergers that
    project only their output. The mergers' own similarity/merge products are the one part the model
    leaves out; they are added here from their shapes (tiny CLIP: width 64, 4 heads of 16)."""
    compressor = build_compressor({"name": name})
    result = None

    def run():
        nonlocal result
        result = tiny.generate(random_image(300, 500), QUESTION, compressor, max_new_tokens=1)

    total, per_module = counted_flops(run)
    vision_counted = total - per_module["LlavaNextForConditionalGeneration"]
    cost = CostModel(tiny.model.config, CostConvention(), tiny.model.dtype, compressor)
    views = result.layout.num_tiles
    extra = 0
    if name == "visionzip":  # key cosine (d = 16) and member means (C = 64) over R - C candidates per view
        dominant, contextual = split_budget(576, compressor.ratio, compressor.contextual_share)
        extra = 2 * views * (577 - dominant - contextual) * contextual * (16 + 64)
    if name == "prumerge_plus":  # each kept token's key cosine with all 576 patches (keys of width 64)
        extra = 2 * (result.visual_tokens_spliced - views) * 576 * 64
    assert vision_counted == cost.vision_of(result)["total"] + extra
    if name == "downsample":
        assert result.layout.tokens_per_tile == 144


def test_visualiser_draws_the_tiles_the_tower_saw_and_skips_cls_sources(tiny):
    """runners.visualize with the peers: downsample's smaller tiles are drawn as encoded (14 s px), and
    VisionZip's [CLS] sources (ids past the patches) have no pixels to mark."""
    from benchmarks import Sample
    from runners.visualize import KEPT, MERGED, token_map, visualize_sample

    sample = Sample(id="noise", image=random_image(290, 660, seed=3), question=QUESTION, answers=("x",))
    vis = visualize_sample(tiny, build_compressor({"name": "downsample", "ratio": 0.25}), sample, 0)
    assert vis.layout.side == 12 and vis.pixels.shape == (vis.layout.num_tiles, 12 * 14, 12 * 14, 3)
    layout = vis.layout
    patches = layout.num_tiles * layout.tokens_per_tile
    # token 0 <- patch 3; token 1 <- tile 0's [CLS] alone; token 2 <- patch 7 and tile 1's [CLS]
    provenance = Provenance(token=torch.tensor([0, 1, 2, 2]), source=torch.tensor([3, patches, 7, patches + 1]))
    states = token_map(layout, provenance).states.view(-1)
    assert states[3] == KEPT and states[7] == KEPT != MERGED  # a [CLS] partner does not make a patch merged
    assert int((states == KEPT).sum()) == 2


def test_paper_table_groups_an_adaptive_count_after_the_ratios():
    from runners.paper_table import _group

    keys = sorted([_group("prumerge_plus", None), _group("hired", 0.1), _group("none", 1.0), _group("hired", 0.5)])
    assert [label for _, label in keys] == ["Upper bound", "Retain 50%", "Retain 10%", "Adaptive count"]
