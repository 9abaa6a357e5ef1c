"""Interface properties every registered compressor must have, on plain tensors (no model).

A new compressor gets these checks for free once its budget formula is added to ``BUDGETS``
(the test below fails until it is): output count equals the documented budget on every grid and
ratio, provenance is in range, unique, and explains every output embedding, and ``ratio=1`` is
vanilla LLaVA-NeXT exactly for methods that claim so.
"""

from __future__ import annotations

import math

import pytest
import torch

from compressors import (
    AnyResLayout,
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


# name -> documented segment length; LLM-stage methods leave the vision segment vanilla.
BUDGETS = {
    "none": _budget_none,
    "random": _budget_random,
    "pooling": _budget_pooling,
    "fastv": _budget_none,
    "globalcom2": _budget_globalcom2,
}


def _build(name: str, ratio: float) -> Compressor:
    return build_compressor({"name": name, "ratio": ratio})


def _valid_ratios(name: str) -> list[float]:
    return [1.0] if name == "none" else RATIOS


def test_every_compressor_documents_its_budget():
    assert set(list_compressors()) <= set(BUDGETS), "add the new compressor's budget formula to BUDGETS"
    assert {"none", "random", "pooling", "fastv"} <= set(list_compressors())


@pytest.mark.parametrize("name", list_compressors())
@pytest.mark.parametrize("layout", PROPERTY_LAYOUTS, ids=lambda l: f"{l.rows}x{l.cols}-{l.image_hw[0]}x{l.image_hw[1]}")
def test_vision_output_properties(name, layout):
    for ratio in _valid_ratios(name):
        compressor = _build(name, ratio)
        inp = vision_input(layout, compressor, seed=int(ratio * 100))
        out = compressor.compress_vision(inp)
        num_tokens, dim = out.embeds.shape
        assert num_tokens == BUDGETS[name](layout, ratio, inp), (name, ratio)
        assert dim == inp.features.shape[-1] and out.embeds.dtype == inp.features.dtype

        token, source = out.provenance.token, out.provenance.source
        assert token.numel() == source.numel()
        assert ((token >= 0) & (token < num_tokens)).all()
        assert ((source >= 0) & (source < layout.num_tiles * layout.tokens_per_tile)).all()
        pairs = token * layout.num_tiles * layout.tokens_per_tile + source
        assert pairs.unique().numel() == pairs.numel(), "duplicate (token, source) pairs"

        # Provenance must explain every embedding: the mean of its sources, or the newline.
        flat = inp.features.reshape(-1, dim).double()
        sums = torch.zeros(num_tokens, dim, dtype=torch.float64).index_add_(0, token, flat[source])
        counts = torch.bincount(token, minlength=num_tokens)
        has_source = counts > 0
        expected = sums[has_source] / counts[has_source, None]
        assert torch.allclose(out.embeds[has_source].double(), expected, atol=1e-5), (name, ratio)
        newline_rows = out.embeds[~has_source]
        assert torch.equal(newline_rows, inp.newline.expand_as(newline_rows))
        assert int((~has_source).sum()) == out.num_newlines

        if counts.max() == 1:  # pruning: each kept source at most once
            assert source.unique().numel() == source.numel()


@pytest.mark.parametrize("name", list_compressors())
def test_full_ratio_identity_claims_are_true(name):
    cls = get_compressor_class(name)
    outcomes = []
    for layout in PROPERTY_LAYOUTS:
        compressor = _build(name, 1.0)
        inp = vision_input(layout, compressor)
        out = compressor.compress_vision(inp)
        vanilla = pack_spatial(inp.features, layout, inp.newline)
        outcomes.append(out.embeds.shape == vanilla.embeds.shape and torch.equal(out.embeds, vanilla.embeds))
    if cls.identity_at_full_ratio:
        assert all(outcomes)
    else:
        assert not all(outcomes), f"{name} says ratio=1 is not the identity, but it was on every layout"


@pytest.mark.parametrize("name", list_compressors())
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_bad_ratio_is_rejected(name, bad):
    with pytest.raises(ValueError, match=r"compressor.ratio"):
        _build(name, bad)


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
# name -> {ratio: image tokens kept of the 233-token span below}, worked out by hand from each paper's rule.
# fastv: round(233 (1 - R)) with R = 1 - r in floats: 233, 174.75 -> 175, 116.5 -> 116 (half to even),
# 58.25 -> 58, and 233 x 0.0999... = 23.29... -> 23.
LLM_BUDGETS = {"fastv": {1.0: 233, 0.75: 175, 0.5: 116, 0.25: 58, 0.1: 23}}


def test_every_llm_stage_compressor_documents_its_budget():
    assert set(LLM_STAGE) <= set(LLM_BUDGETS) and "fastv" in LLM_STAGE


@pytest.mark.parametrize("name", LLM_STAGE)
@pytest.mark.parametrize("ratio", RATIOS)
def test_llm_stage_selection_properties(name, ratio):
    compressor = _build(name, ratio)
    gen = torch.Generator().manual_seed(0)
    length, start, span = 300, 17, 233
    image_mask = torch.zeros(1, length, dtype=torch.bool)
    image_mask[0, start:start + span] = True
    attention = torch.rand(1, 4, length, generator=gen).softmax(-1)
    keep = compressor.select_llm_tokens(LLMInput(
        hidden_states=torch.randn(1, length, 8, generator=gen), image_mask=image_mask,
        position_ids=torch.arange(length)[None], attention=attention))
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == keep.numel()
    assert ((keep >= 0) & (keep < length)).all()
    assert set(range(start)) | set(range(start + span, length)) <= set(keep.tolist())  # text kept
    kept_image = int(image_mask[0, keep].sum())
    assert kept_image == LLM_BUDGETS[name][ratio]
