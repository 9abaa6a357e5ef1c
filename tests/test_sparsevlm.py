"""SparseVLM (v1, v2) against its definition and the authors' own model forward (tests/data/README.md)."""

from __future__ import annotations

import pytest
import torch

from compressors import build_compressor
from compressors.sparsevlm import (AUTHORS_SCHEDULES, dpc_knn_merge, rank_keep_count, rope_ones, select_raters,
                                   stage_counts)
from tests.llm_reference import authors_reference, reference_model, replay, run_with_cache


def test_raters_by_hand():
    """Raters: softmax over the text of image . text, averaged over the image tokens, above the mean.
    Image rows e0, e1; text rows 2 e0, e1, -e0: products [[2, 0, -1], [0, 1, 0]]; row softmaxes
    [.844 .114 .042] and [.212 .576 .212]; column means [.528 .345 .127], mean 1/3: texts 0 and 1."""
    emb = torch.tensor([[9., 9.], [1., 0.], [0., 1.], [2., 0.], [0., 1.], [-1., 0.]])  # text 0, image 1-2, text 3-5
    assert select_raters(emb, 1, 3).tolist() == [0, 1]  # offsets after the image: positions 3 and 4
    assert select_raters(emb * torch.tensor([1., 0.]), 1, 3).tolist() == [0]  # no e1: rows [.844 .114 .042], [1/3]*3 -> means [.589 .224 .188]


def test_stage_counts_follow_the_authors_tables_and_their_layer_convention():
    # ratio = RETAIN_TOKN / 576 gives the authors' table, scaled to N
    assert stage_counts(192 / 576, "v1", (2, 6, 15), 32, 576) == [300, 200, 110]
    assert stage_counts(0.3333, "v2", (2, 6, 15), 32, 576) == [300, 200, 118]
    assert stage_counts(64 / 576, "v1", (2, 6, 15), 32, 576) == [66, 30, 17]
    assert stage_counts(128 / 576, "v2", (2, 6, 15), 32, 2928) == [1210, 549, 305]  # 2928 x 238/576 = 1209.83...
    assert stage_counts(0.3333, "v1", (2, 6, 15), 32, 1752) == [912, 608, 335]  # 912.5 -> 912 (half to even)
    # another ratio scales the 192 table so that the authors' logged mean
    # (2 full layers, 4 at n1, 9 at n2, 17 at n3) / 32 equals it
    counts = stage_counts(0.25, "v1", (2, 6, 15), 32, 57600)
    assert (2 + (4 * counts[0] + 9 * counts[1] + 17 * counts[2]) / 57600) / 32 == pytest.approx(0.25, abs=1e-5)
    assert counts[0] / counts[2] == pytest.approx(300 / 110, abs=1e-3)
    with pytest.raises(ValueError, match="ratio 0.05 is at or below the 2 full layers"):
        stage_counts(0.05, "v1", (2, 6, 15), 32, 576)


def test_dpc_knn_merges_two_obvious_clusters_into_their_means():
    # 11 tokens -> int(11 / 10) + 1 = 2 clusters; two tight groups far apart
    tokens = torch.cat([torch.zeros(6, 4) + torch.arange(6)[:, None] * 1e-3,
                        torch.full((5, 4), 10.0) + torch.arange(5)[:, None] * 1e-3]).double()
    merged, cluster = dpc_knn_merge(tokens, 2, torch.Generator().manual_seed(0))
    assert cluster[:6].unique().numel() == 1 and cluster[6:].unique().numel() == 1 and cluster[0] != cluster[6]
    for c, members in ((int(cluster[0]), tokens[:6]), (int(cluster[6]), tokens[6:])):
        assert torch.allclose(merged[c], members.sum(0) / (members.shape[0] + 1e-6))  # the authors' 1e-6


def test_gravity_map_is_rope_of_ones():
    cos, sin = torch.rand(5, 8), torch.rand(5, 8)
    ones = torch.ones(5, 8)
    rotate_half = torch.cat([-ones[:, 4:], ones[:, :4]], dim=-1)
    assert torch.allclose(rope_ones(cos, sin), ones * cos + rotate_half * sin)


CASES = {"v1_192": 0, "v1_64": 1, "v2_192": 2, "v2_128": 3}


@pytest.mark.parametrize("case", CASES)
def test_matches_the_authors_code(case):
    """Same float64 model and inputs as the authors' LlamaDynamicvitModel run (576 image tokens, their
    LLaVA-1.5 setting): the image tokens kept at every stage, the recycled clusters, every layer's
    KV-cache length, the hidden states at prefill and at three cached decode steps."""
    ref = authors_reference()["sparsevlm"][CASES[case]]
    model = reference_model(ref["num_layers"], ref["seed"])
    version = "v1" if ref["version"] == "1_0" else "v2"
    assert tuple(ref["layers"]) == (2, 6, 15) and ref["retain"] in AUTHORS_SCHEDULES[version]
    sparse = build_compressor({"name": "sparsevlm", "ratio": ref["retain"] / 576, "version": version,
                               "seed": ref["seed"]})
    run = run_with_cache(model, sparse, ref["prefix"], ref["n_img"], ref["suffix"], ref["seed"] + 100, ref["steps"])
    start = ref["prefix"]
    for stage, authors_mask in zip(run.record.stages, ref["kept_image_masks"]):
        kept = stage.keep[(stage.keep >= start) & (stage.keep < start + authors_mask.numel())] - start
        assert kept.tolist() == authors_mask.nonzero().flatten().tolist()
    assert [stage.merged for stage in run.record.stages if stage.merged] == ref["clusters"]
    assert run.cache_lengths == ref["cache_lengths"]
    assert torch.allclose(run.prefill_hidden[-4:], ref["prefill_hidden_tail"], atol=1e-9, rtol=0)
    assert torch.allclose(run.decode_hidden, ref["decode_hidden"], atol=1e-9, rtol=0)
    # and a cache-free recomputation of the recorded stages gives the same decoded states
    replayed = replay(model, run.embeds, run.record, contiguous=version == "v1")[0, -ref["steps"]:]
    assert torch.allclose(replayed, run.decode_hidden, atol=1e-10, rtol=0)


def test_heads_beyond_the_model_are_refused():
    model = reference_model(4, 0, heads=4, kv_heads=4)
    sparse = build_compressor({"name": "sparsevlm", "version": "v2", "layers": [0, 1, 2]})
    with pytest.raises(ValueError, match="keeps 14 attention heads but the model has 4"):
        run_with_cache(model, sparse, 3, 20, 6, 0, 0)


# -- variant=paper: the rank rule ----------------------------------------------------------------


def test_rank_rule_by_hand():
    """P's third rater row is the mean of the first two, so rank(P) = 2 of V = 8 image tokens:
    int(2 * 1.5 + 1) = 4 stay; with scale 13.5, int(27) is capped at V - 1 = 7; a P of full
    column rank (rank 2 = V) prunes nothing (None)."""
    p = torch.tensor([[.5, .5, 0., 0., 0., 0., 0., 0.], [0., 0., .5, .5, 0., 0., 0., 0.],
                      [.25, .25, .25, .25, 0., 0., 0., 0.]])
    assert rank_keep_count(p, 1.5, 1.0) == 4
    assert rank_keep_count(p, 13.5, 0.0) == 7
    assert rank_keep_count(p[:2, :2] + torch.eye(2), 1.0, 0.0) is None
    assert rank_keep_count(torch.ones(4, 6), 0.8, 0.0) == 0  # rank 1: int(0.8) = 0, as the release code's topk(0)


def test_paper_variant_keeps_int_rank_scale_bias_of_the_eager_attention():
    """Stage 0 (after layer 0) against an eager run of the same model: the raters (their rule, by hand),
    rank of their head-mean attention rows over the image, top int(rank * 1 + 2) by rater mean."""
    prefix, n_img, suffix, seed = 3, 40, 8, 5
    model = reference_model(4, seed, attn_implementation="eager")
    sparse = build_compressor({"name": "sparsevlm", "variant": "paper", "scale": 1.0, "bias": 2.0,
                               "layers": [0, 1, 2], "seed": seed})
    run = run_with_cache(model, sparse, prefix, n_img, suffix, seed, 1)
    embeds = run.embeds[0, :prefix + n_img + suffix]
    image, text = embeds[prefix:prefix + n_img], embeds[prefix + n_img:]
    relation = (image @ text.T).softmax(dim=1).mean(dim=0)
    raters = prefix + n_img + (relation > relation.mean()).nonzero().flatten()
    with torch.no_grad():
        attention = model(inputs_embeds=embeds[None], output_attentions=True).attentions[0][0].mean(dim=0)
    p = attention[raters][:, prefix:prefix + n_img]  # [R, V]
    rank = int(torch.linalg.matrix_rank(p.float()))
    assert 1 <= rank <= raters.numel() < n_img
    count = int(rank * 1.0 + 2.0)
    expected = (p.mean(dim=0).topk(count).indices + prefix).sort().values
    stage = run.record.stages[0]
    kept = stage.keep[(stage.keep >= prefix) & (stage.keep < prefix + n_img)]
    assert kept.tolist() == expected.tolist()
    assert stage.merged == int((int((n_img - count) * 0.3) + 1) / 10) + 1  # v1 recycling as the authors
    # the cost model's input: every stage's attention rows were the raters' (fixed per prefill)
    assert run.record.stage_query_rows == [{sparse.llm_signals[1]: raters.numel()}] * 3


def test_paper_variant_prunes_nothing_at_full_rank():
    """3 image tokens and at least 3 raters: P is generically of rank 3 = V, so no stage prunes or
    recycles (the release code's s_flag = False), and every layer sees the whole prompt."""
    prefix, n_img, suffix, seed = 2, 3, 14, 1
    model = reference_model(4, seed)
    sparse = build_compressor({"name": "sparsevlm", "variant": "paper", "scale": 1.0, "bias": 0.0,
                               "layers": [0, 1, 2], "seed": seed})
    run = run_with_cache(model, sparse, prefix, n_img, suffix, seed, 1)
    embeds = run.embeds[0, :prefix + n_img + suffix]
    relation = (embeds[prefix:prefix + n_img] @ embeds[prefix + n_img:].T).softmax(dim=1).mean(dim=0)
    assert int((relation > relation.mean()).sum()) >= n_img
    assert [stage.keep.tolist() for stage in run.record.stages] == [list(range(prefix + n_img + suffix))] * 3
    assert [stage.merged for stage in run.record.stages] == [0, 0, 0]
    assert run.record.layer_image_tokens == [n_img] * 4


def test_variant_and_version_settings_are_checked():
    with pytest.raises(ValueError, match=r"compressor\.variant must be one of authors, paper, got 'v2'; "
                                         r"SparseVLM's version is compressor\.version=v2"):
        build_compressor({"name": "sparsevlm", "variant": "v2"})
    with pytest.raises(ValueError, match=r"compressor\.version must be one of v1, v2, got 'v3'"):
        build_compressor({"name": "sparsevlm", "version": "v3"})
    with pytest.raises(ValueError, match=r"variant=paper .* needs compressor\.version=v1; got version 'v2'"):
        build_compressor({"name": "sparsevlm", "variant": "paper", "version": "v2"})
    with pytest.raises(ValueError, match=r"ratio 0\.5 has no setting .* give compressor\.scale and compressor\.bias"):
        build_compressor({"name": "sparsevlm", "variant": "paper", "ratio": 0.5})
    with pytest.raises(ValueError, match=r"scale=2\.0, bias=None with variant=authors"):
        build_compressor({"name": "sparsevlm", "scale": 2.0})
    # the release scripts' settings: 192 -> 13.5/0 (mme.sh), 128 -> 9/6 (pope.sh), 64 -> 0.8/0 (textvqa.sh)
    for ratio, expected in ((0.3333, (13.5, 0.0)), (128 / 576, (9.0, 6.0)), (0.1111, (0.8, 0.0))):
        sparse = build_compressor({"name": "sparsevlm", "variant": "paper", "ratio": ratio})
        assert (sparse.scale, sparse.bias) == expected
    assert build_compressor({"name": "sparsevlm", "variant": "paper", "ratio": 0.5, "scale": 3, "bias": 0}).scale == 3.0
