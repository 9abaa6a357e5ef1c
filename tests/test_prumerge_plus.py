"""PruMerge+ against the authors' own outputs (HiRED's port), its definition written as a loop, and by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compressors import AnyResLayout, ClsAttention, LayerKeys, VisionInput, build_compressor
from compressors.prumerge_plus import kept_indices, merge_view, outlier_share, single_head_cls_attention

REFERENCE = Path(__file__).parent / "data" / "prumerge_plus_reference.pt"


def test_matches_the_authors_code_exactly():
    """``token_prune_merge_advanced_plus(if_adaptive=True)`` on 12 seeded views: same tokens, same bits."""
    views = torch.load(REFERENCE)["views"]
    assert len(views) == 12
    counts = set()
    for view in views:
        attention = view["cls_attention"]
        kept = kept_indices(attention, outlier_share(attention))
        merged, _, _ = merge_view(view["hidden"][1:], view["keys"][1:], attention, kept, normalise=False)
        assert torch.equal(merged, view["output"])
        counts.add(merged.shape[0])
    assert len(counts) >= 8, "the views should exercise different adaptive counts"


def test_compressor_concatenates_views_on_the_authors_inputs():
    """Five reference views as one 2x2 image: per-head logits from the same q/k, one-head attention rebuilt
    from them, the views' outputs concatenated in order (identity projector)."""
    views = torch.load(REFERENCE)["views"][:5]
    heads, width = 2, views[0]["hidden"].shape[-1]
    head_dim = width // heads
    keys = torch.stack([v["keys"] for v in views])  # [5, 577, C]
    q = torch.stack([v["q_cls"] for v in views])  # [5, C]
    logits = torch.einsum("vhd,vkhd->vhk", q.view(5, heads, head_dim) / math.sqrt(head_dim),
                          keys.view(5, 577, heads, head_dim))  # ClsAttention: (q_h / sqrt(d)) . k_h
    attention = single_head_cls_attention(logits)
    assert torch.allclose(attention, torch.stack([v["cls_attention"] for v in views]), atol=1e-7)
    inp = VisionInput(features=None, layout=AnyResLayout(2, 2, 24, (672, 672)), newline=torch.zeros(width),
                      signals={ClsAttention(-1): logits, LayerKeys(-1): keys.view(5, 577, heads, head_dim)},
                      vision_features=torch.stack([v["hidden"] for v in views]), projector=torch.nn.Identity())
    out = build_compressor({"name": "prumerge_plus"}).compress_vision(inp)
    expected = torch.cat([v["output"] for v in views])
    assert out.embeds.shape == expected.shape and torch.allclose(out.embeds, expected, atol=1e-5)
    assert out.num_newlines == 0 and out.provenance.space == "vision"


def test_outlier_share_by_hand():
    # [1 x 7, 9]: Q1 = Q3 = 1 (numpy linear), IQR 0, bound 1: only the 9 lies above -> 1 / 8
    assert outlier_share(torch.tensor([1.0] * 7 + [9.0])) == 1 / 8
    # 0..99 and one 1000: Q1 = 25, Q3 = 75, bound 150 -> 1 / 101
    assert outlier_share(torch.cat([torch.arange(100.0), torch.tensor([1000.0])])) == 1 / 101
    assert outlier_share(torch.ones(576)) == 0.0


def test_kept_indices_by_hand():
    attention = torch.linspace(1.0, 0.0, 576)  # descending: token i is the i-th strongest
    # share 0.05: top int(28.8) = 28 tokens 0..27; stride int(int(20.0) / 3) = 6: range(0, 575, 6) minus the
    # top tokens = 30, 36, ..., 570 (91 tokens), appended ascending
    kept = kept_indices(attention, 0.05).tolist()
    assert kept == list(range(28)) + list(range(30, 571, 6))
    # share 1/6 and above: stride int(5 / 3) = 1, every token but 575 is sampled
    assert sorted(kept_indices(attention, 0.2).tolist()) == list(range(575))
    # no outlier: the authors divide by zero; vtclab keeps only token 0 (the limit of the stride)
    assert kept_indices(attention, 0.0).tolist() == [0]


def _merge_by_definition(features, keys, attention, kept, normalise):
    """The paper/authors' merge written as a loop over kept tokens: the 32 most key-similar other tokens."""
    normed = F.normalize(keys, dim=-1)
    out = []
    for i in kept.tolist():
        others = [j for j in range(features.shape[0]) if j != i]
        sims = torch.stack([normed[i] @ normed[j] for j in others])
        neighbours = [others[j] for j in sims.argsort(descending=True)[:32].tolist()]
        weights = attention[neighbours]
        if normalise:
            weights = weights / weights.sum()
        out.append(features[i] + (features[neighbours] * weights[:, None]).sum(0))
    pruned = [j for j in range(features.shape[0]) if j not in set(kept.tolist())]
    out.append((features[pruned] * attention[pruned, None]).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("normalise", [False, True])
def test_merge_matches_its_definition(normalise):
    gen = torch.Generator().manual_seed(4)
    features, keys = torch.randn(48, 5, generator=gen), torch.randn(48, 7, generator=gen)
    attention = torch.rand(48, generator=gen).softmax(0)
    kept = torch.tensor([17, 3, 40, 0, 22])
    merged, neighbours, pruned = merge_view(features, keys, attention, kept, normalise)
    assert torch.allclose(merged, _merge_by_definition(features, keys, attention, kept, normalise), atol=1e-6)
    assert neighbours.shape == (5, 32) and not (neighbours == kept[:, None]).any()  # never itself
    assert pruned.tolist() == sorted(set(range(48)) - set(kept.tolist()))


def test_paper_variant_normalises_only_the_merge():
    gen = torch.Generator().manual_seed(5)
    features, keys = torch.randn(40, 3, generator=gen), torch.randn(40, 4, generator=gen)
    attention = torch.rand(40, generator=gen).softmax(0)
    kept = torch.tensor([1, 2])
    authors, neighbours, pruned = merge_view(features, keys, attention, kept, normalise=False)
    paper, _, _ = merge_view(features, keys, attention, kept, normalise=True)
    for row, i in enumerate(kept.tolist()):
        total = attention[neighbours[row]].sum()
        assert torch.allclose(paper[row] - features[i], (authors[row] - features[i]) / total, atol=1e-6)
    assert torch.equal(paper[-1], authors[-1])  # the extra token is the same weighted sum


def test_flat_attention_keeps_one_token_and_the_extra_per_view():
    layout = AnyResLayout(1, 2, 24, (336, 672))
    gen = torch.Generator().manual_seed(6)
    inp = VisionInput(features=None, layout=layout, newline=torch.zeros(4),
                      signals={ClsAttention(-1): torch.zeros(3, 2, 577), LayerKeys(-1): torch.randn(3, 577, 2, 2, generator=gen)},
                      vision_features=torch.randn(3, 577, 4, generator=gen), projector=torch.nn.Identity())
    out = build_compressor({"name": "prumerge_plus"}).compress_vision(inp)
    assert out.num_tokens == 3 * 2


def test_single_head_attention_is_the_full_width_dot_product():
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(8, generator=gen), torch.randn(577, 8, generator=gen)  # 4 heads of 2
    per_head = torch.einsum("hd,khd->hk", q.view(4, 2) / math.sqrt(2), k.view(577, 4, 2))[None]  # ClsAttention
    expected = ((k @ q) / math.sqrt(8)).softmax(-1)[1:]
    assert torch.allclose(single_head_cls_attention(per_head)[0], expected, atol=1e-7)


def test_options():
    assert build_compressor({"name": "prumerge_plus"}).describe() == {
        "name": "prumerge_plus", "ratio": None, "budget": {"scope": "per_view", "count_newlines": False},
        "variant": "authors", "layer": -1}
    with pytest.raises(ValueError, match="compressor.variant must be one of authors, paper; got 'x'"):
        build_compressor({"name": "prumerge_plus", "variant": "x"})
