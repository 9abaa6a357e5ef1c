"""Interface properties every registered compressor must have, on plain tensors (no model).

A new compressor gets these checks for free once its budget formula is added to ``BUDGETS``
(the test below fails until it is): output count equals the documented budget on every grid and
ratio, provenance is in range, unique, and explains every output embedding, and ``ratio=1`` is
vanilla LLaVA-NeXT exactly for methods that claim so.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from compressors import (
    AnyResLayout,
    Budget,
    ClsAttention,
    Compressor,
    LLMInput,
    build_compressor,
    get_compressor_class,
    list_compressors,
    register_compressor,
)
from compressors.packing import pack_spatial
from compressors.registry import compressor_parameters
from tests.conftest import PROPERTY_LAYOUTS, RATIOS, vision_input
from tests.test_globalcom2 import definition_count as globalcom2_definition_count


def _crop_valid_counts(layout: AnyResLayout) -> list[int]:
    return layout.tile_valid_mask("hf")[1:].sum(dim=1).tolist()


def _budget_none(layout, ratio, inp):
    return layout.vanilla_token_count()


def _budget_random(layout, ratio, inp):
    # floor(576 r) thumbnail tokens + floor(N_c r) per crop + one newline per unpadded row
    return (math.floor(576 * ratio) + sum(math.floor(n * ratio) for n in _crop_valid_counts(layout))
            + layout.valid_box("hf").height)


def _budget_pooling(layout, ratio, inp):
    side = max(1, round(24 * math.sqrt(ratio)))
    box = layout.with_side(side).valid_box("hf")
    return side * side + box.height * (box.width + 1)


def _budget_globalcom2(layout, ratio, inp):
    # the paper's allocation written out in plain Python (tests/test_globalcom2.py), from the same scores
    scores = inp.signals[ClsAttention(-1)][:, :, 1:].mean(1)  # [tiles, P]: head mean, [CLS] key dropped
    return globalcom2_definition_count(layout, scores, ratio)[0]


def _per_view(ratio):
    # VisionZip (D + C) and FasterVLM (T) keep T = floor(576 r + 0.5) tokens in every view, no newlines
    return math.floor(576 * ratio + 0.5)


def _budget_per_view(layout, ratio, inp):
    return layout.num_tiles * _per_view(ratio)


def _cls_probs(logits):
    # the [CLS] query's softmax over all 1 + 576 keys, the [CLS] key dropped: [tiles, heads, 576]
    return logits.double().softmax(-1)[:, :, 1:]


def _budget_hired(layout, ratio, inp):
    # HiRED (authors' rule): B = int(V 576 r); thumbnail min(int(B a), 576) by layer-22 scores; crops share
    # B_sub = min(B - B_full, (V - 1) 576) by how many of the thumbnail's top int(576 (1 - a)) layer-0 tokens
    # lie in each of n equal row bands (b_i = int(float32(c_i / sum c) * B_sub), the authors' float32 tensor
    # arithmetic); each crop's top b_i, counted only inside LLaVA's unpadded box
    alpha, views = 0.5, layout.num_tiles
    importance = _cls_probs(inp.signals[ClsAttention(-2)]).sum(1)
    content = _cls_probs(inp.signals[ClsAttention(0)]).sum(1)[0]
    if ratio >= 1:  # the authors skip the selection: every unpadded token, no newline
        return 576 + int(layout.tile_valid_mask("llava")[1:].sum())
    total = int(views * 576 * ratio)
    full = min(int(total * alpha), 576)
    sub = min(total - full, (views - 1) * 576)
    top = set(np.argsort(-content.numpy(), kind="stable")[: int(576 * (1 - alpha))].tolist())
    band = 576 // layout.num_crops
    shares = [sum(1 for t in top if t // band == c) for c in range(layout.num_crops)]
    valid = layout.tile_valid_mask("llava")
    kept = full
    for c, share in enumerate(shares):
        fraction = np.float32(share) / np.float32(sum(shares))
        budget = min(int(fraction * np.float32(sub)), 576) if sub > 0 else 0
        chosen = np.argsort(-importance[c + 1].numpy(), kind="stable")[:budget]
        kept += int(valid[c + 1][torch.as_tensor(chosen, dtype=torch.long)].sum())
    return kept


def _budget_prumerge_plus(layout, ratio, inp):
    # PruMerge+ per view: one-head [CLS] attention of the last layer (q . k / sqrt(heads d) = sum of the per-head
    # logits / sqrt(heads)); f = share above Q3 + 1.5 IQR; top int(576 f) + the stride-int(int(1/f)/3) samples
    # of range(0, 575) not already kept + 1 extra token
    logits = inp.signals[ClsAttention(-1)].double()
    total = 0
    for view in logits:
        attention = (view.sum(0) / math.sqrt(view.shape[0])).softmax(-1)[1:].float().numpy()
        q1, q3 = np.percentile(attention, 25), np.percentile(attention, 75)
        share = int((attention > q3 + 1.5 * (q3 - q1)).sum()) / 576
        top = set(np.argsort(-attention, kind="stable")[: int(576 * share)].tolist())
        stride = int(int(1 / share) / 3) if share else 576
        total += len(top) + len(set(range(0, 575, stride)) - top) + 1
    return total


# name -> documented segment length; LLM-stage methods leave the vision segment vanilla, and so does
# downsample, whose reduction happens on the image (tests/test_downsample.py counts it).
BUDGETS = {
    "none": _budget_none,
    "random": _budget_random,
    "pooling": _budget_pooling,
    "fastv": _budget_none,
    "pdrop": _budget_none,
    "sparsevlm": _budget_none,
    "dart": _budget_none,
    "globalcom2": _budget_globalcom2,
    "hired": _budget_hired,
    "fastervlm": _budget_per_view,
    "visionzip": _budget_per_view,
    "prumerge_plus": _budget_prumerge_plus,
    "downsample": _budget_none,
}


def _build(name: str, ratio: float | None) -> Compressor:
    return build_compressor({"name": name, "ratio": ratio})


def _valid_ratios(name: str) -> list[float | None]:
    if get_compressor_class(name).adaptive_budget:
        return [None]
    return [1.0] if name == "none" else RATIOS


def _full_ratio(name: str) -> float | None:
    return None if get_compressor_class(name).adaptive_budget else 1.0


def test_every_compressor_documents_its_budget():
    assert set(list_compressors()) <= set(BUDGETS), "add the new compressor's budget formula to BUDGETS"
    assert {"none", "random", "pooling", "fastv"} <= set(list_compressors())


@pytest.mark.parametrize("name", list_compressors())
@pytest.mark.parametrize("layout", PROPERTY_LAYOUTS, ids=lambda l: f"{l.rows}x{l.cols}-{l.image_hw[0]}x{l.image_hw[1]}")
def test_vision_output_properties(name, layout):
    for ratio in _valid_ratios(name):
        compressor = _build(name, ratio)
        inp = vision_input(layout, compressor, seed=int((ratio or 0) * 100))
        out = compressor.compress_vision(inp)
        num_tokens, dim = out.embeds.shape
        assert num_tokens == BUDGETS[name](layout, ratio, inp), (name, ratio)
        assert dim == inp.newline.shape[-1] and out.embeds.dtype == inp.newline.dtype

        provenance = out.provenance
        token, source = provenance.token, provenance.source
        patches = layout.num_tiles * layout.tokens_per_tile
        assert token.numel() == source.numel()
        assert ((token >= 0) & (token < num_tokens)).all()
        assert ((source >= 0) & (source < patches + (layout.num_tiles if provenance.space == "vision" else 0))).all()
        pairs = token * (patches + layout.num_tiles) + source
        assert pairs.unique().numel() == pairs.numel(), "duplicate (token, source) pairs"

        # Provenance must explain every embedding: sum of weight x source (the mean of its sources without
        # weights), taken over the projected features or, for CLIP-space mergers, over the vision tower's
        # tokens and then projected; tokens without a source are the newline.
        counts = torch.bincount(token, minlength=num_tokens)
        weight = provenance.weight.double() if provenance.weight is not None else 1.0 / counts[token].double()
        if provenance.space == "vision":
            table = inp.vision_tokens_by_source().double()
        else:
            table = inp.features.reshape(-1, dim).double()
        sums = torch.zeros(num_tokens, table.shape[-1], dtype=torch.float64).index_add_(
            0, token, table[source] * weight[:, None])
        has_source = counts > 0
        expected = sums[has_source]
        if provenance.space == "vision":
            expected = copy.deepcopy(inp.projector).double()(expected)
        assert torch.allclose(out.embeds[has_source].double(), expected, atol=1e-5), (name, ratio)
        newline_rows = out.embeds[~has_source]
        assert torch.equal(newline_rows, inp.newline.expand_as(newline_rows))
        assert int((~has_source).sum()) == out.num_newlines

        if counts.max() == 1:  # pruning: each kept source at most once
            assert source.unique().numel() == source.numel()


@pytest.mark.parametrize("name", [n for n in list_compressors() if build_compressor({"name": n}).llm_layer is None])
def test_full_ratio_identity_claims_are_true(name):
    """Vision-stage methods; the LLM-stage ones are checked at their stage below."""
    cls = get_compressor_class(name)
    outcomes = []
    for layout in PROPERTY_LAYOUTS:
        compressor = _build(name, _full_ratio(name))
        inp = vision_input(layout, compressor)
        out = compressor.compress_vision(inp)
        features = inp.features if inp.features is not None else inp.projector(inp.vision_features[:, 1:])
        vanilla = pack_spatial(features, layout, inp.newline)
        outcomes.append(out.embeds.shape == vanilla.embeds.shape and torch.equal(out.embeds, vanilla.embeds))
        if not outcomes[-1] and not cls.identity_at_full_ratio:
            break  # one layout where it is not the identity settles the claim
    if cls.identity_at_full_ratio:
        assert all(outcomes)
    else:
        assert not all(outcomes), f"{name} says ratio=1 is not the identity, but it was on every layout"


@pytest.mark.parametrize("name", list_compressors())
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_bad_ratio_is_rejected(name, bad):
    if bad is None and get_compressor_class(name).adaptive_budget:
        assert _build(name, None).ratio is None  # adaptive methods take no ratio
        return
    with pytest.raises(ValueError, match=r"compressor.ratio"):
        _build(name, bad)


def test_adaptive_methods_refuse_every_ratio():
    adaptive = [n for n in list_compressors() if get_compressor_class(n).adaptive_budget]
    assert adaptive == ["prumerge_plus"]
    for ratio in (1.0, 0.5, 0.25):
        with pytest.raises(ValueError, match=r"compressor.ratio must be null for prumerge_plus"):
            _build("prumerge_plus", ratio)


@pytest.mark.parametrize("name", list_compressors())
def test_declared_budgets_refuse_other_conventions(name):
    compressor = build_compressor({"name": name})
    if compressor.budget is None:
        return  # this method does not declare its budget convention
    declared = compressor.budget.as_dict()
    assert compressor.describe()["budget"] == declared
    assert build_compressor({"name": name, "budget": declared}).budget == compressor.budget
    other = {**declared, "scope": "global" if declared["scope"] == "per_view" else "per_view"}
    with pytest.raises(ValueError, match=r"compressor.budget .* is not supported by this method; allowed: "):
        build_compressor({"name": name, "budget": other})
    with pytest.raises(ValueError, match=r"compressor.budget.scope must be one of per_view, global; got 'tile'"):
        build_compressor({"name": name, "budget": {**declared, "scope": "tile"}})
    with pytest.raises(ValueError, match=r"compressor.budget must be a mapping with keys scope, count_newlines"):
        build_compressor({"name": name, "budget": {"scope": declared["scope"]}})
    assert Budget.parse(None, (compressor.budget,)) == compressor.budget


def test_none_rejects_partial_ratio():
    with pytest.raises(ValueError, match="keeps every token"):
        _build("none", 0.5)


def test_registry_errors_name_the_allowed_values():
    with pytest.raises(ValueError) as err:
        build_compressor({"name": "fastvv"})
    assert "Did you mean 'fastv'" in str(err.value) and "random" in str(err.value)
    with pytest.raises(ValueError, match="ratoi.*Did you mean 'ratio'.*Allowed: ratio, seed"):
        build_compressor({"name": "random", "ratoi": 0.5})
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_compressor({"ratio": 0.5})
    with pytest.raises(ValueError, match="already registered"):
        register_compressor("random")(type("Other", (Compressor,), {}))
    with pytest.raises(TypeError, match="Compressor subclass"):
        register_compressor("not-a-compressor")(object)


@pytest.mark.parametrize("name", list_compressors())
def test_config_file_keys_are_constructor_arguments(name):
    """conf/compressor/<name>.yaml exists and its keys are exactly the class's arguments + name."""
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "conf" / "compressor" / f"{name}.yaml"
    assert path.exists(), f"missing {path}"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg["name"] == name
    assert set(cfg) - {"name"} == set(compressor_parameters(get_compressor_class(name)))
    build_compressor(cfg)


LLM_STAGE = [n for n in list_compressors() if build_compressor({"name": n}).llm_layer is not None]
SPAN, DEPTH = 233, 100  # image tokens of the synthetic stage input; decoder depth it claims


def _llm_budget_fastv(ratio):
    # round(233 (1 - R)) with R = 1 - r in floats: 233, 174.75 -> 175, 116.5 -> 116 (half to even),
    # 58.25 -> 58, and 233 x 0.0999... = 23.29... -> 23.
    return {1.0: 233, 0.75: 175, 0.5: 116, 0.25: 58, 0.1: 23}[ratio]


def _llm_budget_pdrop(ratio):
    # stages 8/16/24 of 100 layers: (8 + 8 l + 8 l^2 + 76 l^3) / 100 = r, the real root in [0, 1]
    import numpy as np

    roots = np.roots([76, 8, 8, 8 - 100 * ratio])
    lam = min(r.real for r in roots if abs(r.imag) < 1e-9 and -1e-9 <= r.real <= 1 + 1e-9)
    return math.floor(SPAN * lam + 1e-9)


def _llm_budget_sparsevlm(ratio):
    # the 192 table (300, 200, 110 of 576) scaled so that (2 + 4 f1 + 9 f2 + 85 f3) / 100 = r, at most
    # N - 1 kept; v1 recycles int(0.3 pruned) + 1 of the rest into int(m / 10) + 1 tokens
    scale = (ratio * DEPTH - 2) / ((4 * 300 + 9 * 200 + 85 * 110) / 576)
    kept = min(round(SPAN * scale * 300 / 576), SPAN - 1)
    recycled = int((SPAN - kept) * 0.3) + 1
    return kept + int(recycled / 10) + 1


def _llm_budget_dart(ratio):
    # 4 image pivots + 8 pivots x int(min(N r, N - 4) // 8)
    return 4 + 8 * int(min(SPAN * ratio, SPAN - 4) // 8)


# name -> image tokens after the first stage for the synthetic input, written out from each paper's rule.
LLM_BUDGETS = {"fastv": _llm_budget_fastv, "pdrop": _llm_budget_pdrop, "sparsevlm": _llm_budget_sparsevlm,
               "dart": _llm_budget_dart}


def test_every_llm_stage_compressor_documents_its_budget():
    assert set(LLM_STAGE) <= set(LLM_BUDGETS) and {"fastv", "pdrop", "sparsevlm", "dart"} <= set(LLM_STAGE)


def _stage_input(compressor: Compressor, seed: int = 0) -> LLMInput:
    """A first-stage input with random values for every signal the compressor declares."""
    from compressors import AttentionRows, DecoderKeys, DecoderOutput, PromptEmbeddings
    from models.llm_signals import query_positions

    gen = torch.Generator().manual_seed(seed)
    length, start, heads, head_dim = 300, 17, 16, 8
    image_mask = torch.zeros(1, length, dtype=torch.bool)
    image_mask[0, start:start + SPAN] = True
    positions = torch.arange(length)
    angles = positions[:, None] / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    angles = torch.cat([angles, angles], dim=-1)[None]  # [1, L, d]
    hidden = torch.randn(1, length, 8, generator=gen)
    inp = LLMInput(hidden_states=hidden, image_mask=image_mask, position_ids=positions[None], num_layers=DEPTH,
                   layer=compressor.llm_layers[0] if compressor.llm_layers else 1, original_positions=positions,
                   position_embeddings=(angles.cos(), angles.sin()), prefill_image_tokens=SPAN)
    values = {DecoderKeys: lambda r: torch.randn(1, heads, length, head_dim, generator=gen),
              DecoderOutput: lambda r: torch.randn(1, length, 8, generator=gen), PromptEmbeddings: lambda r: hidden}
    for request in compressor.llm_signals:
        if type(request) in values:
            inp.signals[request] = values[type(request)](request)
    for request in compressor.llm_signals:
        if isinstance(request, AttentionRows):
            mask = compressor.llm_query_mask(inp) if request.queries == "mask" else None
            rows = query_positions(request, inp, mask)
            inp.signals[request] = torch.rand(1, heads, rows.numel(), length, generator=gen).softmax(-1)
    return inp


@pytest.mark.parametrize("name", LLM_STAGE)
@pytest.mark.parametrize("ratio", RATIOS)
def test_llm_stage_selection_properties(name, ratio):
    from compressors import LLMDecision

    compressor = _build(name, ratio)
    inp = _stage_input(compressor)
    answer = compressor.select_llm_tokens(inp)
    decision = answer if isinstance(answer, LLMDecision) else LLMDecision(keep=answer)
    keep, length, start = decision.keep, inp.image_mask.shape[1], 17
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == keep.numel()
    assert ((keep >= 0) & (keep < length)).all()
    assert set(range(start)) | set(range(start + SPAN, length)) <= set(keep.tolist())  # text kept
    kept_image = int(inp.image_mask[0, keep].sum())
    assert kept_image + decision.num_merged == LLM_BUDGETS[name](ratio), (name, ratio)
    if ratio == 1.0:  # the identity claim, at the stage: every image token, nothing merged
        identity = kept_image == SPAN and decision.num_merged == 0
        assert identity == get_compressor_class(name).identity_at_full_ratio, name
