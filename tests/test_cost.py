"""The analytic cost model, checked three ways: hand-computed configs, torch's FlopCounterMode (tiny
model with real weights; 7B/13B/Mistral-7B decoder shapes on the meta device), and the GlobalCom2
paper's efficiency table. Plus the per-sample cost keys of ``runners.evaluate``."""

from __future__ import annotations

import copy
import functools
import json
import statistics
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

import runners.resolvers  # noqa: F401
import runners.schema  # noqa: F401
from compressors import AnyResLayout, AttentionRows, build_compressor
from models.cost import (
    CostConvention,
    CostModel,
    DecoderShape,
    PrefillTokens,
    cost_summary,
    counted_flops,
    decode_step_flops,
    kv_cache_bytes,
    prefill_flops,
)
from models.random_arch import shipped_config
from tests.conftest import random_image

CONF = Path(__file__).resolve().parents[1] / "conf"
VICUNA_7B = "llava-hf/llava-v1.6-vicuna-7b-hf"
VICUNA_13B = "llava-hf/llava-v1.6-vicuna-13b-hf"
MISTRAL_7B = "llava-hf/llava-v1.6-mistral-7b-hf"


@pytest.fixture()
def compose_cfg():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides=(): compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def presets() -> dict[str, CostConvention]:
    """Every ``conf/cost`` preset, built as the runners build it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        built = {}
        for path in sorted((CONF / "cost").glob("*.yaml")):
            cost = compose(config_name="config", overrides=[f"cost={path.stem}"]).cost
            built[path.stem] = CostConvention(**OmegaConf.to_container(cost, resolve=True, enum_to_str=True))
    GlobalHydra.instance().clear()
    return built


@functools.lru_cache(maxsize=None)
def architecture(hub_id: str):
    """A shipped config, parsed once (read only here)."""
    return shipped_config(hub_id)


# -- (2) hand-computed small configs ------------------------------------------------------------

# d = 8, 2 query heads and 1 KV head of width 4 (GQA), MLP width 12, vocabulary 10, 2 layers.
SMALL = DecoderShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=12, vocab=10, mlp_matrices=3)
# A prompt of 3 text tokens and 5 image tokens, one of them a newline: n = 8 at both layers.
PROMPT = PrefillTokens.uniform(2, visual=5, text=3, newlines=1)


def test_small_config_from_a_transformers_config():
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=12,
                         num_hidden_layers=2, vocab_size=10)
    assert DecoderShape.from_config(config) == SMALL
    with pytest.raises(ValueError, match="does not know decoder type 'gpt2'; known: llama, mistral"):
        DecoderShape.from_config(type("C", (), {"model_type": "gpt2"})())


def test_prefill_by_hand():
    # per layer, n = 8 tokens, 2 FLOPs per multiply-add:
    #   projections: q and o 8x8, k and v 8x4 -> 8 * (64 + 64 + 32 + 32) MACs = 1536 -> 3072 FLOPs
    #   scores: QK^T and AV, 2 heads x 4 wide x 8 x 8 pairs each -> 2 * 512 MACs -> 2048 FLOPs
    #   MLP: 3 matrices 8x12 -> 8 * 288 MACs = 2304 -> 4608 FLOPs
    # two layers: 2 * 9728 = 19456; LM head on the last position: 8 x 10 MACs -> 160 FLOPs
    flops = prefill_flops(SMALL, PROMPT, CostConvention())
    assert flops == {"attention_projections": 6144, "attention_scores": 4096, "mlp": 9216, "lm_head": 160,
                     "total": 19616}
    # causal: 8 * 9 / 2 = 36 pairs instead of 64 -> scores 2 * 2 * 8 * 36 = 1152 per layer
    assert prefill_flops(SMALL, PROMPT, CostConvention(attention="causal"))["total"] == 2 * (3072 + 1152 + 4608) + 160
    # visual tokens only, no newlines, no LM head: n = 4 -> 1536 + 2 * 2 * 8 * 16 + 2304 per layer
    paper = CostConvention(include_text=False, include_newlines=False, lm_head=False)
    assert prefill_flops(SMALL, PROMPT, paper)["total"] == 2 * (1536 + 512 + 2304)
    # MAC-style with a 2-matrix MLP (FastV's eq. 5): 1536 + 1024 + 1536 per layer
    assert prefill_flops(SMALL, PROMPT, CostConvention(flops_per_mac=1, mlp_matrices=2, lm_head=False))["total"] \
        == 2 * (1536 + 1024 + 1536)
    # LLM-Viewer's element-wise ops: softmax 5 * 2 heads * 64 + (2 norms * 7 + 2 adds + act 2) * 8 * 8
    assert prefill_flops(SMALL, PROMPT, CostConvention(elementwise=True))["elementwise"] == 2 * (640 + 18 * 64)


def test_per_layer_lengths_decode_and_kv_by_hand():
    # an LLM-stage cut after layer 0: layer 1 keeps 2 of the 5 image tokens (the newline dropped)
    pruned = PrefillTokens(layer_lengths=(8, 5), layer_newlines=(1, 0), text=3)
    layer = {8: 3072 + 2048 + 4608, 5: 2 * 5 * 192 + 2 * 2 * 8 * 25 + 2 * 5 * 288}
    assert prefill_flops(SMALL, pruned, CostConvention())["total"] == layer[8] + layer[5] + 160
    # visual only: layer 0 counts 4 tokens, layer 1 counts 2
    visual = CostConvention(include_text=False, include_newlines=False, lm_head=False)
    assert pruned.counted(visual) == [4, 2]
    # first decoding step: one query per layer against its prefill length + itself
    #   layer 0: 192 + 2 * 8 * 9 + 288 MACs; layer 1: 192 + 2 * 8 * 6 + 288 MACs; LM head 80 MACs
    assert decode_step_flops(SMALL, pruned, CostConvention()) == 2 * ((192 + 144 + 288) + (192 + 96 + 288) + 80)
    assert decode_step_flops(SMALL, pruned, CostConvention(), step=3) == 2 * ((192 + 176 + 288) + (192 + 128 + 288)
                                                                            + 80)
    # KV: K and V of 1 head x 4 wide per token per layer: (8 + 5) tokens * 8 elements
    assert kv_cache_bytes(SMALL, pruned, CostConvention(), torch.float32) == 13 * 8 * 4
    assert kv_cache_bytes(SMALL, pruned, CostConvention(kv_dtype="float16"), torch.float32) == 13 * 8 * 2
    assert kv_cache_bytes(SMALL, pruned, visual, torch.bfloat16) == (4 + 2) * 8 * 2


def test_bad_conventions_fail_clearly():
    with pytest.raises(ValueError, match="cost.attention must be one of full, causal, got 'half'"):
        CostConvention(attention="half")
    with pytest.raises(ValueError, match="flops_per_mac must be 1 or 2"):
        CostConvention(flops_per_mac=3)
    with pytest.raises(ValueError, match="kv_dtype must be null .* float16, bfloat16, float32, got 'int8'"):
        CostConvention(kv_dtype="int8")
    with pytest.raises(ValueError, match="cover 3 decoder layers, the model has 2"):
        prefill_flops(SMALL, PrefillTokens.uniform(3, 5), CostConvention())


def test_fastv_equation_5(presets):
    """FastV's eq. 5 and ratio, evaluated here from the paper's formula, against the ``fastv_eq5`` preset."""
    d, m, layers, k = 4096, 11008, 32, 2

    def f(n: int) -> int:  # FastV eq. 5, one layer
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    cost = CostModel(architecture(VICUNA_7B), presets["fastv_eq5"])
    # 60 text tokens and 2,928 image tokens (newlines included); FastV keeps half from layer K = 2 on
    full = PrefillTokens.uniform(layers, visual=2928, text=60, newlines=48)
    fastv = PrefillTokens((2988,) * k + (1524,) * (layers - k), (48,) * layers, 60)
    assert cost.prefill(full)["total"] == layers * f(2988)
    ratio = cost.prefill(fastv)["total"] / cost.prefill(full)["total"]
    assert ratio == pytest.approx((k * f(2988) + (layers - k) * f(1524)) / (layers * f(2988)), rel=1e-12)
    assert round(100 * ratio, 1) == 50.9


# -- (3) the GlobalCom2 paper's efficiency table ------------------------------------------------

# images/efficiency.jpg of xuyang-liu16/GlobalCom2@96b2d00 (A100-80GB, one 2 x 2 image, 2,880 visual tokens)
PAPER_TFLOPS = {
    VICUNA_7B: {1.0: 41.7, 0.75: 30.4, 0.5: 19.7, 0.25: 9.6, 0.1: 3.8},
    VICUNA_13B: {1.0: 80.0, 0.75: 58.7, 0.5: 38.3, 0.25: 18.7, 0.1: 7.4},
}
PAPER_KV_MB = {
    VICUNA_7B: {1.0: 1536.0, 0.75: 1126.4, 0.5: 755.0, 0.25: 377.0, 0.1: 151.0},
    VICUNA_13B: {1.0: 2457.6, 0.75: 1843.2, 0.5: 1228.8, 0.25: 590.0, 0.1: 236.0},
}
PAPER_VISUAL_TOKENS = AnyResLayout(2, 2, 24, (672, 672)).vanilla_token_count() - 2 * 24  # 2,928 minus 48 newlines


def paper_tokens(hub_id: str, ratio: float) -> PrefillTokens:
    return PrefillTokens.uniform(architecture(hub_id).text_config.num_hidden_layers, round(PAPER_VISUAL_TOKENS * ratio))


@pytest.mark.parametrize("hub_id", [VICUNA_7B, VICUNA_13B])
def test_paper_tflops_column(presets, hub_id):
    assert PAPER_VISUAL_TOKENS == 2880
    cost = CostModel(architecture(hub_id), presets["globalcom2_paper"])
    for ratio, paper in PAPER_TFLOPS[hub_id].items():
        assert cost.prefill(paper_tokens(hub_id, ratio))["total"] / 1e12 == pytest.approx(paper, rel=0.03), ratio


def test_paper_kv_column(presets):
    """1,536 MB (all tokens) and 377 MB (r = .25) within 3%. Every entry of both models is reproduced
    exactly by one display rule: at 1 GB or more, GB rounded to 0.1 and printed as x 1024 'MB';
    below, MB rounded to an integer (1.51 GB -> '1536.0', 1.13 GB -> '1126.4', 377.5 MB -> '377')."""
    convention = presets["globalcom2_paper"]
    kv = {hub: {r: CostModel(architecture(hub), convention).kv_cache(paper_tokens(hub, r)) for r in table}
          for hub, table in PAPER_KV_MB.items()}
    assert kv[VICUNA_7B][1.0] / 1e6 == pytest.approx(1536.0, rel=0.03)
    assert kv[VICUNA_7B][0.25] / 1e6 == pytest.approx(377.0, rel=0.03)
    for hub, table in PAPER_KV_MB.items():
        for ratio, paper in table.items():
            shown = round(kv[hub][ratio] / 1e9, 1) * 1024 if kv[hub][ratio] >= 1e9 else round(kv[hub][ratio] / 1e6)
            assert shown == pytest.approx(paper, abs=1e-9), (hub, ratio)


def test_paper_flops_reduced_to_9_1_percent(presets):
    """The abstract's "FLOPs to 9.1%" (r = 0.1) counts visual tokens only; with the prompt's text and
    the 48 unpruned newlines, the same pruning leaves about 12%."""
    paper = CostModel(architecture(VICUNA_7B), presets["globalcom2_paper"])
    ratio = paper.prefill(paper_tokens(VICUNA_7B, 0.1))["total"] / paper.prefill(paper_tokens(VICUNA_7B, 1.0))["total"]
    assert round(100 * ratio, 1) == 9.1
    every_token = CostModel(architecture(VICUNA_7B), presets["default"])
    full = PrefillTokens.uniform(32, visual=2928, text=60, newlines=48)
    kept = PrefillTokens.uniform(32, visual=288 + 48, text=60, newlines=48)
    assert 0.11 < every_token.prefill(kept)["total"] / every_token.prefill(full)["total"] < 0.13


# -- (1) torch's FlopCounterMode ----------------------------------------------------------------


@pytest.mark.parametrize("hub_id", [VICUNA_7B, MISTRAL_7B, VICUNA_13B])
def test_flop_counter_on_full_size_decoder_layers(hub_id):
    """Two decoder layers of the real shape (Mistral: GQA with 8 KV heads) on the meta device: the
    counter sees every matmul and SDPA call at 2,928 tokens without allocating the weights."""
    text = copy.deepcopy(shipped_config(hub_id, text_layers=2).text_config)
    text._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
        embeds = torch.empty(1, 2928, text.hidden_size)
    counted, _ = counted_flops(lambda: model(inputs_embeds=embeds, logits_to_keep=1))
    analytic = prefill_flops(DecoderShape.from_config(text), PrefillTokens.uniform(2, 2928), CostConvention())
    assert counted == pytest.approx(analytic["total"], rel=0.02)
    assert counted == analytic["total"]  # same conventions, op for op: exact in practice


@pytest.mark.parametrize("name", ["fastv", "globalcom2"])  # LLM stage; vision stage with a vision signal
def test_flop_counter_on_the_tiny_model(tiny, name):
    """A real prefill (``generate`` with one new token) of the tiny model with real weights: the
    language model (per-layer lengths of FastV's cut, its attention-row signal, the LM head) and the
    vision side (tower layers run, patch embedding, projector, GlobalCom2's [CLS] signal)."""
    compressor = build_compressor({"name": name})
    result = None

    def run():
        nonlocal result
        result = tiny.generate(random_image(14, 300), "What is this?", compressor, max_new_tokens=1)

    total, per_module = counted_flops(run)
    language = per_module["LlavaNextForConditionalGeneration"]
    cost = CostModel(tiny.model.config, CostConvention(), tiny.model.dtype, compressor)
    prefill = cost.prefill(PrefillTokens.from_result(result))["total"]
    vision = cost.vision_tower(result.layout.num_tiles)["total"]
    assert language == pytest.approx(prefill, rel=0.02) and total - language == pytest.approx(vision, rel=0.02)
    assert (language, total - language) == (prefill, vision)  # exact in practice
    rows = result.layout.valid_box().height  # vanilla packing: one newline per unpadded row
    if name == "fastv":
        assert result.layer_lengths[:2] == [result.prompt_tokens] * 2
        assert result.layer_lengths[2:] == [result.prompt_tokens - result.visual_tokens_spliced
                                            + result.visual_tokens_after] * 2
        # the newlines layers >= K keep, from the hook's kept segment positions and the geometry
        box = result.layout.valid_box()
        newline_positions = {576 + (row + 1) * (box.width + 1) - 1 for row in range(box.height)}
        prepared = tiny.prepare(random_image(14, 300), "What is this?", compressor)
        with torch.inference_mode(), tiny.llm_stage(compressor, prepared) as stage:
            tiny.model(**tiny.model_inputs(prepared), logits_to_keep=1)
        kept = len(newline_positions & set(stage.record.kept_segment_index.tolist()))
        assert result.layer_newlines == [rows, rows, kept, kept]
    else:  # GlobalCom2's authors' layout: a newline after each of the padded canvas's 24 rows
        assert result.layer_newlines == [24] * 4 and rows < 24


# -- the per-sample keys of runners.evaluate ------------------------------------------------------


def tiny_prefill_flops(n: int) -> int:
    """One tiny decoder layer at n tokens, from its dimensions (d 128, 4 q / 2 kv heads of 32, MLP 256)."""
    return 2 * n * 128 * (128 + 64 + 64 + 128) + 2 * 2 * 128 * n * n + 2 * 3 * n * 128 * 256


def test_evaluate_records_and_summary_carry_cost(compose_cfg, tiny, tmp_path, monkeypatch):
    import runners.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "build_pipeline", lambda cfg: tiny)
    cfg = compose_cfg(["compressor=fastv", "benchmark.limit=1", "benchmark.max_new_tokens=2", "progress=false"])
    summary = evaluate_module.evaluate(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    vocab = tiny.model.config.text_config.vocab_size
    for r in records:
        pruned = r["visual_tokens_spliced"] - r["visual_tokens_after"]
        lengths = [r["prompt_tokens"]] * 2 + [r["prompt_tokens"] - pruned] * 2  # FastV K = 2 of 4 layers
        expected = sum(tiny_prefill_flops(n) for n in lengths) + 2 * 128 * vocab
        assert r["prefill_tflops"] == pytest.approx(expected / 1e12, rel=1e-4)  # + the attention row at K-1
        assert r["kv_cache_mb"] == pytest.approx(sum(lengths) * 2 * 2 * 32 * 4 / 1e6)
        assert r["vision_tflops"] > 0
    cost = summary["cost"]
    for key in ("prefill_tflops", "vision_tflops", "kv_cache_mb"):
        assert cost[key] == pytest.approx(statistics.fmean(r[key] for r in records))
    assert cost["convention"]["name"] == "default" and cost["convention"]["attention"] == "full"


def test_cost_summary_means_and_convention():
    records = [{"prefill_tflops": 1.0, "vision_tflops": 0.5, "kv_cache_mb": 10.0},
               {"prefill_tflops": 3.0, "vision_tflops": 1.5, "kv_cache_mb": 30.0},
               {"prefill_tflops": 8.0},  # an older record without the other keys
               {}]
    summary = cost_summary(records, CostConvention(name="x", attention="causal"))
    assert (summary["prefill_tflops"], summary["vision_tflops"], summary["kv_cache_mb"]) == (4.0, 1.0, 20.0)
    assert summary["convention"]["name"] == "x" and summary["convention"]["attention"] == "causal"
    assert cost_summary([{}], CostConvention())["prefill_tflops"] is None


# -- (4) the LLM-stage signals, by hand --------------------------------------------------------------


@pytest.mark.parametrize(("name", "per_stage"), [
    # FastV: the last token's row at layer K-1 reuses that layer's q/k: q.k for every key, per head
    ("fastv", lambda d, n: d * n),
    # PyramidDrop: layer K's k_proj recomputed for all n tokens and q_proj for the last one (d x d each,
    # Vicuna has no GQA), then q.k for every key
    ("pdrop", lambda d, n: d * d * n + d * d + d * n),
    # DART: keys and normed outputs the layers computed anyway
    ("dart", lambda d, n: 0),
])
def test_llm_signals_are_counted_at_each_stage_input(presets, name, per_stage):
    config = shipped_config(VICUNA_7B)
    compressor = build_compressor({"name": name})
    d = 4096  # Vicuna-7B: 32 heads x 128
    lengths = tuple(3000 - 100 * i for i in range(32))  # any per-layer input lengths
    tokens = PrefillTokens(lengths, (0,) * 32, text=60)
    model = CostModel(config, presets["default"], torch.float16, compressor)
    flops = model.prefill(tokens)
    expected = 2 * sum(per_stage(d, lengths[layer - 1]) for layer in compressor.llm_layers)  # 2 FLOPs a MAC
    assert flops.get("signals", 0) == expected
    assert flops["total"] == prefill_flops(model.decoder, tokens, presets["default"])["total"] + expected


def test_text_guided_signals_are_counted_with_the_rows_each_stage_used(presets):
    """SparseVLM's raters (``queries="mask"``, layer K-1's own q/k): R_s rows against every key of the
    stage input, per head; a ``"stage"``-layer request of instruction rows also pays layer K's k_proj for
    every token and q_proj for its rows; with ``elementwise`` the softmax adds 5 FLOPs per score. The
    rows are what the hook recorded per stage; none recorded is an error, and no warning is left."""
    config = shipped_config(VICUNA_7B)
    d, heads = 4096, 32  # Vicuna-7B: 32 heads x 128, no GQA
    lengths = tuple(3000 - 100 * i for i in range(32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped methods leave nothing uncounted
        sparse = build_compressor({"name": "sparsevlm"})
        model = CostModel(config, presets["default"], torch.float16, sparse)
    raters = sparse.llm_signals[1]
    rows = ({raters: 17}, {raters: 17}, {raters: 9})  # per stage (stages at layers 3, 7, 16)
    tokens = PrefillTokens(lengths, (0,) * 32, text=60, query_rows=rows)
    expected = 2 * (17 * d * lengths[2] + 17 * d * lengths[6] + 9 * d * lengths[15])
    assert model.prefill(tokens)["signals"] == expected
    plain = prefill_flops(model.decoder, tokens, presets["default"])["total"]
    assert model.prefill(tokens)["total"] == plain + expected
    with pytest.raises(ValueError, match=r"queries='mask'.* at LLM stage 0 needs the number of query rows it used"):
        model.prefill(PrefillTokens(lengths, (0,) * 32, text=60))

    instruction = AttentionRows(layer="stage", queries="instruction")
    method = SimpleNamespace(vision_signals=(), llm_signals=(instruction,), llm_layers=(5,),
                             uses_projected_features=True)
    n, r = lengths[4], 23
    tokens = PrefillTokens(lengths, (0,) * 32, text=60, query_rows=({instruction: r},))
    per_stage = d * d * n + d * d * r + d * r * n  # k_proj of every token, q_proj of the rows, q.k
    assert CostModel(config, presets["default"], torch.float16, method).prefill(tokens)["signals"] == 2 * per_stage
    counted = CostModel(config, CostConvention(elementwise=True), torch.float16, method).prefill(tokens)["signals"]
    assert counted == 2 * per_stage + 5 * heads * r * n
