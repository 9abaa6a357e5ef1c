"""PyramidDrop against its definition and the authors' own ``pdrop_forward`` (tests/data/README.md)."""

from __future__ import annotations

import pytest
import torch

from compressors import build_compressor
from compressors.pdrop import mean_retention, pdrop_keep_counts, pdrop_lambda, pdrop_select
from tests.llm_reference import authors_reference, reference_model, replay, run_with_cache


def test_ratio_is_the_layer_mean_retention():
    # 8/16/24 on 32 layers: mean = (8 + 8 l + 8 l^2 + 8 l^3) / 32; the authors' l = 0.5 is (1+.5+.25+.125)/4
    assert mean_retention(0.5, (8, 16, 24), 32) == 15 / 32
    assert pdrop_lambda(15 / 32, (8, 16, 24), 32) == 0.5
    # the author's recipe for 64 of 576 tokens (PyramidDrop#29): stages 2/8/16, l = 0.19
    assert mean_retention(0.19, (2, 8, 16), 32) == pytest.approx((2 + 6 * .19 + 8 * .19 ** 2 + 16 * .19 ** 3) / 32)
    assert pdrop_lambda(mean_retention(0.19, (2, 8, 16), 32), (2, 8, 16), 32) == 0.19
    assert pdrop_lambda(1.0, (8, 16, 24), 32) == 1.0
    with pytest.raises(ValueError, match=r"ratio 0.1 is below .*\(8/32 = 0.2500.*\[2, 8, 16\]"):
        pdrop_lambda(0.1, (8, 16, 24), 32)


def test_keep_counts_are_the_authors_floors():
    assert pdrop_keep_counts(2928, 0.5, 3) == [1464, 732, 366]  # N/2, N/4, N/8 of a 2x2 LLaVA-NeXT image
    assert pdrop_keep_counts(150, 0.19, 3) == [28, 5, 1]  # int(28.5), int(5.415), int(1.02885)
    assert build_compressor({"name": "pdrop", "ratio": 15 / 32}).keep_counts(2928, 32) == [1464, 732, 366]


def test_selection_by_hand():
    # positions: text 0-1, image 2-7, text 8; head-mean attention of the last token on the image
    # [.10 .30 .05 .20 .25 .10] -> keep 3: positions 3, 5, 6 (+ all text)
    attention = torch.tensor([[0, 0, .1, .3, .05, .2, .25, .1, 0], [0, 0, .1, .3, .05, .2, .25, .1, 0]])
    image = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    assert pdrop_select(attention, image, 3).tolist() == [0, 1, 3, 5, 6, 8]


def test_ratio_one_keeps_everything_without_a_stage():
    assert build_compressor({"name": "pdrop", "ratio": 1.0}).llm_layers == ()
    assert build_compressor({"name": "pdrop"}).llm_layers == (8, 16, 24)


@pytest.mark.parametrize("case", range(3))
def test_matches_the_authors_code(case):
    """Same float64 model and inputs as the authors' pdrop_forward run: the kept positions of every
    stage, every layer's KV-cache length, and the hidden states of the prefill and of three cached
    decode steps (whose positions continue the compacted numbering)."""
    ref = authors_reference()["pdrop"][case]
    model = reference_model(ref["num_layers"], ref["seed"])
    layers = tuple(ref["layer_list"])
    pdrop = build_compressor({"name": "pdrop", "ratio": mean_retention(ref["lam"], layers, ref["num_layers"]),
                              "layers": list(layers), "score_dtype": "model"})
    run = run_with_cache(model, pdrop, ref["prefix"], ref["n_img"], ref["suffix"], ref["seed"] + 100, ref["steps"])
    assert [stage.keep.tolist() for stage in run.record.stages] == ref["stage_keep"]
    assert run.cache_lengths == ref["cache_lengths"]
    assert torch.allclose(run.prefill_hidden[-4:], ref["prefill_hidden_tail"], atol=1e-10, rtol=0)
    assert torch.allclose(run.decode_hidden, ref["decode_hidden"], atol=1e-10, rtol=0)


def test_kv_lengths_halve_at_each_stage_and_decoding_equals_a_cache_free_replay():
    """peer_methods.md section 11: per-layer KV lengths N, N/2, N/4, N/8 (+ text) with the authors'
    lambda = 0.5; every cached decode step equals recomputing the pruned sequence from scratch."""
    model = reference_model(32, 1)
    prefix, n_img, suffix, steps = 5, 64, 12, 3
    run = run_with_cache(model, build_compressor({"name": "pdrop"}), prefix, n_img, suffix, 101, steps)
    text = prefix + suffix
    expected = [text + 64] * 8 + [text + 32] * 8 + [text + 16] * 8 + [text + 8] * 8
    assert run.cache_lengths == expected
    assert run.record.layer_image_tokens == [64] * 8 + [32] * 8 + [16] * 8 + [8] * 8
    assert run.record.image_tokens_layer_mean == (8 + 4 + 2 + 1) / 32 * 64
    replayed = replay(model, run.embeds, run.record, contiguous=True)[0]
    assert torch.allclose(replayed[-steps:], run.decode_hidden, atol=1e-10, rtol=0)
    assert torch.allclose(replayed[:text + 8], run.prefill_hidden, atol=1e-10, rtol=0)


def test_a_stage_with_no_image_tokens_left_keeps_the_text():
    """At the lowest reachable ratio lambda = 0: the first stage drops every image token, the next ones
    have nothing to select."""
    from tests.llm_reference import reference_model, run_with_cache

    pdrop = build_compressor({"name": "pdrop", "ratio": 0.25, "layers": [1, 2, 3]})
    run = run_with_cache(reference_model(4, 0), pdrop, 3, 20, 5, 0, 1)
    assert run.record.layer_image_tokens == [20, 0, 0, 0] and run.cache_lengths == [28, 8, 8, 8]
