"""DART against its definition and the authors' own model forward (tests/data/README.md)."""

from __future__ import annotations

import pytest
import torch

from compressors import build_compressor
from compressors.dart import dart_select, dart_token_topk
from tests.llm_reference import authors_reference, reference_model, replay, run_with_cache


@pytest.mark.parametrize(("num_image", "ratio", "kept"), [
    (576, 128 / 576, 4 + 8 * 16),  # the authors' LLaVA-1.5 scripts: B = 128 -> 132
    (2928, 320 / 2928, 4 + 8 * 40),  # their LLaVA-NeXT default B = 320 -> 324
    (2928, 0.25, 4 + 8 * 91),  # B = 732 -> k = 91
    (2340, 0.1, 4 + 8 * 29),  # B = 234.0 -> k = 29
    (40, 1.0, 4 + 8 * 4),  # B capped at N - 4 = 36 -> k = 4: ratio 1 still drops 4 tokens
])
def test_kept_count_is_4_plus_8_floor_b_over_8(num_image, ratio, kept):
    assert build_compressor({"name": "dart", "ratio": ratio}).keep_count(num_image) == kept
    assert 4 + 8 * dart_token_topk(num_image, ratio, 4, 4) == kept


def test_selection_by_the_definition():
    """2 + 2 pivots, 12 image tokens (positions 1..12), text 13..15. Keys: the image pivots are the
    two largest L1 norms among the image tokens (3: |5|+|5|, 9: 8), the text pivots 14 and 15.
    B = 12 * 0.5 = 6 -> k = int(6 // 4) = 1: each pivot, in the order the authors' set gives, takes the
    remaining image token least cosine-similar to it (plain Python below)."""
    start, end, length = 1, 13, 16
    keys = torch.ones(length, 2)
    keys[3], keys[9], keys[14], keys[15] = torch.tensor([5., -5.]), torch.tensor([-4., 4.]), 3, 2
    normed = torch.randn(length, 3, generator=torch.Generator().manual_seed(0))
    kept = dart_select(keys, normed, start, end, 0.5, pivots_image=2, pivots_text=2).tolist()

    def cosine(a, b):
        va, vb = normed[a].tolist(), normed[b].tolist()
        dot = sum(x * y for x, y in zip(va, vb))
        return dot / (sum(x * x for x in va) ** 0.5 * sum(y * y for y in vb) ** 0.5)

    pool, expected = set(range(start, end)) - {3, 9}, {3, 9}
    for pivot in list({3, 9} | {14, 15}):
        best = min(pool, key=lambda j: cosine(pivot, j))
        expected.add(best)
        pool.discard(best)
    assert kept == sorted(expected) and len(kept) == 2 + 4 * 1


@pytest.mark.parametrize("case", range(4))
def test_matches_the_authors_code(case):
    """Same float64 model and inputs as the authors' DART run (LLaVA-NeXT path): the kept image
    positions, every layer's KV-cache length, the hidden states at prefill and at three cached decode
    steps, and a cache-free recomputation of the same decisions."""
    ref = authors_reference()["dart"][case]
    model = reference_model(ref["num_layers"], ref["seed"])
    dart = build_compressor({"name": "dart", "ratio": ref["ratio"], "layer": ref["K"]})
    run = run_with_cache(model, dart, ref["prefix"], ref["n_img"], ref["suffix"], ref["seed"] + 100, ref["steps"])
    keep = run.record.stages[0].keep
    image = keep[(keep >= ref["prefix"]) & (keep < ref["prefix"] + ref["n_img"])]
    assert image.tolist() == ref["kept_image"].tolist()
    assert image.numel() == dart.keep_count(ref["n_img"])
    assert run.cache_lengths == ref["cache_lengths"]
    assert torch.allclose(run.prefill_hidden[-4:], ref["prefill_hidden_tail"], atol=1e-10, rtol=0)
    assert torch.allclose(run.decode_hidden, ref["decode_hidden"], atol=1e-10, rtol=0)
    replayed = replay(model, run.embeds, run.record, contiguous=False)[0, -ref["steps"]:]
    assert torch.allclose(replayed, run.decode_hidden, atol=1e-10, rtol=0)


def test_too_few_text_tokens_for_the_pivots_is_refused():
    keys, normed = torch.randn(20, 4), torch.randn(20, 4)
    with pytest.raises(ValueError, match="dart needs 4 text tokens after the image for its pivots, got 2"):
        dart_select(keys, normed, 2, 18, 0.5)
