"""The LLM-stage hook in real deployments: pre-existing forwards kept, accelerate dispatch, output
flags, no-mask/no-cache calls, checked selections, and the token accounting every table reads."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from compressors import Compressor, LLMSignal, build_compressor
from compressors.packing import spatial_source_order
from models.cost import CostConvention, CostModel, PrefillTokens
from models.llm_stage import LLMStagePruning
from models.pipeline import LlavaNextPipeline
from models.tiny import build_tiny_llava_next
from tests.conftest import masked_reference_logits

QUESTION = "What color is the circle?\nAnswer the question using a single word or phrase."


def test_an_instance_forward_is_kept_and_restored_exactly(tiny, images):
    """accelerate installs an instance-level ``forward`` (``add_hook_to_module``) when it dispatches or
    offloads a model: pruning must run through it and leave that very object in place."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    fastv = build_compressor({"name": "fastv", "ratio": 0.25})
    expected = tiny.generate(images["2x2-padded"], QUESTION, fastv, max_new_tokens=4)
    lm = tiny.model.model.language_model
    add_hook_to_module(lm, CountingHook())
    try:
        installed = vars(lm)["forward"]
        got = tiny.generate(images["2x2-padded"], QUESTION, fastv, max_new_tokens=4)
        assert vars(lm).get("forward") is installed, "the pre-existing instance forward was replaced or deleted"
        assert CountingHook.calls == 4  # prefill + 3 decode steps ran through accelerate's wrapper
        assert got.text == expected.text and got.visual_tokens_after == expected.visual_tokens_after
    finally:
        remove_hook_from_module(lm)
        vars(lm).pop("forward", None)  # accelerate leaves the bound class forward on the instance


@pytest.mark.filterwarnings("ignore:The following device_map keys")
def test_fastv_on_a_model_dispatched_over_two_devices(images):
    """A device_map that offloads decoder layers 1 and 3 to disk (accelerate's hooks on those layers):
    FastV gives the same tokens and prefill logits as on the undispatched model."""
    from accelerate import dispatch_model

    model, processor = build_tiny_llava_next(seed=0)
    reference = LlavaNextPipeline(model, processor)
    fastv = build_compressor({"name": "fastv", "ratio": 0.25})
    image = images["2x2-padded"]
    expected = reference.generate(image, QUESTION, fastv, max_new_tokens=5)
    expected_logits = reference.prefill_logits(image, QUESTION, fastv)
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
                  "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
                  "model.language_model.layers.2": "cpu", "model.language_model.layers.3": "disk",
                  "model.language_model.norm": "cpu", "lm_head": "cpu"}
    with tempfile.TemporaryDirectory() as offload:
        dispatched, _ = build_tiny_llava_next(seed=0)
        dispatched = dispatch_model(dispatched, device_map=device_map, main_device="cpu", offload_dir=offload)
        layers = dispatched.model.language_model.layers
        assert "forward" in vars(layers[1]), "accelerate did not hook the offloaded layer"
        pipeline = LlavaNextPipeline(dispatched, processor)
        got = pipeline.generate(image, QUESTION, fastv, max_new_tokens=5)
        assert torch.equal(pipeline.prefill_logits(image, QUESTION, fastv), expected_logits)
        assert "forward" in vars(layers[1]) and "forward" in vars(layers[3])
    assert got.text == expected.text and got.new_tokens == expected.new_tokens
    assert got.visual_tokens_layer_mean == expected.visual_tokens_layer_mean


def test_output_hidden_states_while_pruning(tiny, images):
    """transformers' output capture still works: layers >= K report the kept positions only."""
    fastv = build_compressor({"name": "fastv", "ratio": 0.25, "layer": 2})
    prepared = tiny.prepare(images["1x2"], QUESTION, fastv)
    with torch.inference_mode():
        stage = tiny.llm_stage(fastv, prepared)
        with stage:
            out = tiny.model(**tiny.model_inputs(prepared), output_hidden_states=True)
    lengths = [h.shape[1] for h in out.hidden_states]
    full, kept = prepared.input_ids.shape[1], stage.record.keep.numel()
    assert lengths == [full, full, full, kept, kept]  # embeddings, outputs of layers 0..3


def test_no_mask_and_no_cache_equals_the_masked_reference(tiny, images):
    """Called with neither a padding mask nor a cache, the kept positions' gaps must not be read as
    packed-sequence boundaries (a block-diagonal mask for layers >= K)."""
    fastv = build_compressor({"name": "fastv", "ratio": 0.25, "layer": 2})
    prepared = tiny.prepare(images["1x3"], QUESTION, fastv)
    lm = tiny.model.model.language_model
    with torch.inference_mode():
        embeds = tiny.model.get_input_embeddings()(prepared.input_ids)
        embeds[0][prepared.input_ids[0] == tiny.image_token_id] = prepared.segment.embeds
        stage = tiny.llm_stage(fastv, prepared)
        with stage:
            hidden = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state  # no mask, no cache
        got = tiny.model.lm_head(hidden[0, -1])
        expected = masked_reference_logits(tiny.model, embeds, stage.record.keep, embeds.shape[1], 2)[0, -1]
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


class _Returns(Compressor):
    """An LLM-stage compressor that returns a fixed (bad) selection."""

    def __init__(self, fn) -> None:
        super().__init__(1.0)
        self.fn = fn
        self.llm_layer = 2

    def select_llm_tokens(self, inp):
        return self.fn(inp.image_mask[0])


def _all(mask):
    return torch.arange(mask.numel())


BAD_SELECTIONS = {
    "unsorted": (lambda m: _all(m).flip(0), "not strictly increasing"),
    "repeated": (lambda m: torch.cat([_all(m)[:1], _all(m)]), "not strictly increasing"),
    "out of range": (lambda m: torch.cat([_all(m), torch.tensor([m.numel()])]), "positions 0.."),
    "float": (lambda m: _all(m).float(), "1-D torch.long"),
    "2-D": (lambda m: _all(m)[None], "1-D torch.long"),
    "text dropped": (lambda m: _all(m)[1:], "text positions were dropped"),
    "last dropped": (lambda m: _all(m)[:-1], "last prompt position"),
    "empty": (lambda m: _all(m)[:0], "no positions"),
}


@pytest.mark.parametrize("case", BAD_SELECTIONS)
def test_a_bad_selection_is_refused_naming_the_compressor(tiny, images, case):
    fn, message = BAD_SELECTIONS[case]
    compressor = _Returns(fn)
    compressor.name = "my_method"
    with pytest.raises(ValueError, match=rf"compressor 'my_method': select_llm_tokens must .*{message}"):
        tiny.prefill_logits(images["1x2"], QUESTION, compressor)


def test_unknown_signals_are_refused(tiny, images):
    from compressors import VisionSignal
    from models.vision import encode_tiles

    class Mystery(LLMSignal):
        pass

    class WantsMystery(_Returns):
        @property
        def llm_signals(self):
            return (Mystery(),)

    known = "AttentionRows, DecoderKeys, DecoderOutput, PromptEmbeddings"
    with pytest.raises(ValueError, match=f"unknown LLM signal .*Mystery.*can compute: {known}"):
        tiny.prefill_logits(images["1x2"], QUESTION, WantsMystery(_all))

    class Keys(VisionSignal):
        pass

    tiles = tiny.processor_inputs(images["1x2"], QUESTION)["pixel_values"][0, :3]
    with pytest.raises(ValueError, match=r"unknown vision signal .*Keys\(layer=-1\).*can compute: ClsAttention"):
        encode_tiles(tiny.model, tiles, [Keys()])


def test_token_accounting_by_hand_on_one_fastv_generate(tiny, images):
    """640 x 480 on the 2x2 grid: 576 + 36 rows x (48 + 1) = 2,340 image tokens. FastV, K=2, r=0.25,
    on the 4-layer decoder: layers 0-1 see 2,340, layers 2-3 see 2340 x 0.25 = 585, so the layer
    mean is (2 x 2340 + 2 x 585) / 4 = 1462.5. The kept tokens are the top 585 image positions of
    layer 1's head-mean last-token attention (from an eager copy of the model), and the provenance
    lists exactly their source ids (newlines have none)."""
    fastv = build_compressor({"name": "fastv", "ratio": 0.25, "layer": 2})
    image = images["2x2-padded"]
    result = tiny.generate(image, QUESTION, fastv, max_new_tokens=3)
    assert result.visual_tokens_before == result.visual_tokens_spliced == 2340
    assert result.visual_tokens_after == 585
    assert result.visual_tokens_layer_mean == 1462.5

    eager = copy.deepcopy(tiny.model)
    eager.config.text_config._attn_implementation = "eager"
    inputs = tiny.processor_inputs(image, QUESTION)
    with torch.inference_mode():
        attention = eager(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)  # [L] at layer K-1
    image_positions = (inputs["input_ids"][0] == tiny.image_token_id).nonzero().flatten()
    top = attention[image_positions].topk(585).indices  # index in the image segment
    order = spatial_source_order(result.layout)  # segment index -> source id, -1 for newlines
    expected = sorted(s for s in order[top].tolist() if s >= 0)
    assert sorted(result.provenance.source.tolist()) == expected
    assert result.provenance.token.max() < 585 and result.provenance.token.unique().numel() == len(expected)


# -- several stages, merged tokens, decision checks ------------------------------------------------


def _layer_mean_by_hand(name: str, n: int) -> tuple[list[int], float]:
    """Image tokens of each of the tiny decoder's 4 layers, from each method's rule (stages scaled)."""
    import numpy as np

    if name == "pdrop":  # stages 1/2/3 of 4 at ratio 0.5: (1 + l + l^2 + l^3) / 4 = 0.5
        lam = next(r.real for r in np.roots([1, 1, 1, -1]) if abs(r.imag) < 1e-9)
        counts = [n] + [int(n * lam ** s + 1e-9) for s in (1, 2, 3)]
    elif name == "sparsevlm":  # after layers 0/1/2, the authors' 192 table (300, 200, 110 of 576), v1 recycling
        counts, current = [n], n
        for table in (300, 200, 110):
            kept = min(round(n * table / 576), current - 1)
            recycled = int((current - kept) * 0.3) + 1
            current = kept + int(recycled / 10) + 1
            counts.append(current)
    else:  # dart, K = 2, ratio 0.25: 4 + 8 int(min(n / 4, n - 4) // 8) from layer 2 on
        kept = 4 + 8 * int(min(n * 0.25, n - 4) // 8)
        counts = [n, n, kept, kept]
    return counts, sum(counts) / 4


STAGED = {"pdrop": {"name": "pdrop", "ratio": 0.5, "layers": [1, 2, 3]},
          "sparsevlm": {"name": "sparsevlm", "ratio": 0.3333, "layers": [0, 1, 2]},
          "dart": {"name": "dart", "ratio": 0.25}}


@pytest.mark.parametrize("name", STAGED)
def test_layer_mean_by_hand_for_every_method(tiny, images, name):
    """The numbers a results table shows, from one generate: image tokens per layer, their mean, the
    last layer's count, and provenance that only names sources of the image, once each."""
    result = tiny.generate(images["1x2"], QUESTION, build_compressor(STAGED[name]), max_new_tokens=1)
    counts, mean = _layer_mean_by_hand(name, result.visual_tokens_spliced)
    assert result.visual_tokens_after == counts[-1]
    assert result.visual_tokens_layer_mean == mean
    source = result.provenance.source
    assert source.unique().numel() == source.numel()  # a source is kept or merged once
    assert int(result.provenance.token.max()) < counts[-1]
    assert ((source >= 0) & (source < result.layout.num_tiles * 576)).all()
    per_token = torch.bincount(result.provenance.token)
    assert bool((per_token > 1).any()) == (name == "sparsevlm")  # only v1's recycled tokens merge sources
    # newline tokens per layer (the cost model's input): vanilla's one per row, then only fewer
    newlines = result.layer_newlines
    assert newlines[0] == result.layout.valid_box().height and newlines == sorted(newlines, reverse=True)
    assert all(n <= c for n, c in zip(newlines, counts))
    # tokens with a source plus newline tokens: every final image token is one or the other
    assert int(result.provenance.token.unique().numel()) + newlines[-1] == counts[-1]
    # the attention rows each stage used reach the per-sample cost: SparseVLM's R raters at every
    # stage, R x (4 heads x 32) MACs per key of the stage input (layer K-1's), 2 FLOPs a MAC
    compressor = build_compressor(STAGED[name])
    if name == "sparsevlm":
        (raters,) = {rows[compressor.llm_signals[1]] for rows in result.signal_query_rows}
        assert len(result.signal_query_rows) == 3 and 1 <= raters < result.prompt_tokens - result.visual_tokens_spliced
        cost = CostModel(tiny.model.config, CostConvention(), tiny.model.dtype, compressor)
        signals = cost.prefill(PrefillTokens.from_result(result))["signals"]
        assert signals == 2 * sum(raters * 128 * result.layer_lengths[k - 1] for k in compressor.llm_layers)


def test_provenance_compose_by_hand():
    from compressors import Provenance

    # segment of 4 tokens: 0 <- {10}, 1 <- {11, 12} (pooled), 2 newline, 3 <- {13}
    base = Provenance(token=torch.tensor([0, 1, 1, 3]), source=torch.tensor([10, 11, 12, 13]))
    # new segment: token 0 keeps segment token 3; token 1 merges segment tokens 0, 1 and 2
    got = base.compose(token=torch.tensor([0, 1, 1, 1]), member=torch.tensor([3, 0, 1, 2]), length=4)
    assert got.token.tolist() == [0, 1, 1, 1] and got.source.tolist() == [13, 10, 11, 12]
    assert got.weight is None and got.space == "projected"
    # weighted sources (a vision-space merge): token 1 = mean of members 0 and 1 -> halves of their weights
    weighted = Provenance(token=torch.tensor([0, 1, 1, 3]), source=torch.tensor([10, 11, 12, 13]),
                          weight=torch.tensor([1.0, 0.25, 0.75, 1.0]), space="vision")
    got = weighted.compose(token=torch.tensor([0, 1, 1]), member=torch.tensor([3, 0, 1]), length=4)
    assert got.token.tolist() == [0, 1, 1, 1] and got.source.tolist() == [13, 10, 11, 12]
    assert got.weight.tolist() == [1.0, 0.5, 0.125, 0.375] and got.space == "vision"


class _Decides(Compressor):
    """An LLM-stage compressor that returns a fixed decision."""

    llm_positions = "original"

    def __init__(self, fn, layers=(2,)) -> None:
        super().__init__(1.0)
        self.fn, self.llm_layers = fn, tuple(layers)

    def select_llm_tokens(self, inp):
        return self.fn(inp)


def _merge(**changes):
    """Keep everything but image positions 4 and 5, which become one merged token after position 3."""
    from compressors import LLMDecision

    def fn(inp):
        length = inp.image_mask.shape[1]
        keep = torch.tensor([p for p in range(length) if p not in (4, 5)])
        fields = dict(keep=keep, merged=inp.hidden_states[0, 4:6].mean(0, keepdim=True), merged_at=4,
                      merged_token=torch.tensor([0, 0]), merged_member=torch.tensor([4, 5]),
                      merged_position_ids=torch.tensor([4]))
        fields.update(changes)
        return LLMDecision(**fields)

    return fn


BAD_DECISIONS = {
    "merged width": (dict(merged=torch.zeros(1, 3, dtype=torch.float64)), r"needs merged \[M >= 1, 128\]"),
    "merged_at": (dict(merged_at=99), "needs merged_at in 0.."),
    "no pairs": (dict(merged_token=None), "merged_token/merged_member pairs"),
    "member not image": (dict(merged_member=torch.tensor([0, 5])), "members that are image positions"),
    "uncovered token": (dict(merged_token=torch.tensor([1, 1])), "every merged token 0..0 to have members"),
    "no position ids": (dict(merged_position_ids=None), r"needs merged_position_ids \[1\]"),
}


@pytest.mark.parametrize("case", BAD_DECISIONS)
def test_a_bad_decision_is_refused_naming_the_compressor(case):
    from tests.llm_reference import reference_model, run_with_cache

    changes, message = BAD_DECISIONS[case]
    compressor = _Decides(_merge(**changes))
    compressor.name = "my_merger"
    with pytest.raises(ValueError, match=rf"compressor 'my_merger': an LLMDecision with merged tokens .*{message}"):
        run_with_cache(reference_model(3, 0), compressor, 2, 8, 3, 0, 0)


def test_a_merged_token_decodes_like_its_cache_free_replay():
    """Original positions with a merged token at position id 4, two stages: cached decoding equals the
    cache-free recomputation, and the record maps the merged token to both of its members."""
    from tests.llm_reference import reference_model, replay, run_with_cache

    model = reference_model(4, 3)
    run = run_with_cache(model, _Decides(_merge(), layers=(1, 2)), 2, 8, 3, 5, 3)
    assert [stage.length for stage in run.record.stages] == [12, 11]  # 13 - 2 + 1, then again
    assert run.record.layer_image_tokens == [8, 7, 6, 6]
    first = run.record.stages[0]
    assert first.merged == 1 and first.decision.merged_at == 4
    replayed = replay(model, run.embeds, run.record, contiguous=False)[0, -3:]
    assert torch.allclose(replayed, run.decode_hidden, atol=1e-10, rtol=0)
    # image segment 0..7 at positions 2..9. Stage 1 merges segments 2, 3 (positions 4, 5) into one token
    # at index 4; stage 2 merges that token and segment 4 (now at 4, 5): final image tokens
    # [seg 0, seg 1, {2, 3, 4}, seg 5, seg 6, seg 7]
    assert run.record.image_token.tolist() == [0, 1, 2, 2, 2, 3, 4, 5]
    assert run.record.segment_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert run.record.kept_segment_index.tolist() == [0, 1, 5, 6, 7]


@pytest.mark.parametrize("layers", [(2, 2), (3, 1), (0,), (1, 4), ()])
def test_stage_layers_are_checked_against_the_model(layers):
    from tests.llm_reference import reference_model, run_with_cache

    with pytest.raises(ValueError, match=r"llm_layers .* out of range .* strictly increasing layers in 1..3"):
        run_with_cache(reference_model(4, 0), _Decides(lambda inp: None, layers=layers), 2, 8, 3, 0, 0)


@pytest.mark.parametrize("name", ["pdrop", "sparsevlm", "dart"])
def test_a_padded_prompt_position_stays_masked_through_every_stage_and_step(name):
    """The 2-D padding mask is cut with the sequence at every stage and extended by every decode step:
    cached decoding with a padded prompt position equals the cache-free replay that masks it as a key."""
    from tests.llm_reference import reference_model, replay, run_with_cache

    settings = {"pdrop": {"name": "pdrop", "ratio": 0.5, "layers": [1, 2, 3]},
                "sparsevlm": {"name": "sparsevlm", "ratio": 0.3333, "layers": [0, 1, 2], "version": "v1"},
                "dart": {"name": "dart", "ratio": 0.25}}[name]
    model = reference_model(4, 9)
    compressor = build_compressor(settings)
    run = run_with_cache(model, compressor, 3, 48, 6, 9, 3, padded=(1,))
    replayed = replay(model, run.embeds, run.record, contiguous=compressor.llm_positions == "contiguous", padded=(1,))
    assert torch.allclose(replayed[0, -3:], run.decode_hidden, atol=1e-10, rtol=0)
    unpadded = replay(model, run.embeds, run.record, contiguous=compressor.llm_positions == "contiguous")
    assert not torch.allclose(unpadded[0, -3:], run.decode_hidden, atol=1e-6)  # the mask mattered


def test_signal_requests_are_checked_and_instruction_rows_are_the_text_after_the_image():
    from compressors import AttentionRows, LLMInput
    from models.llm_signals import query_positions

    for key, bad in (("layer", "next"), ("queries", "all"), ("dtype", "float16")):
        with pytest.raises(ValueError, match=rf"AttentionRows.{key} must be one of .*got '{bad}'"):
            AttentionRows(**{key: bad})
    image = torch.zeros(1, 12, dtype=torch.bool)
    image[0, 3:8] = True
    inp = LLMInput(hidden_states=torch.zeros(1, 12, 4), image_mask=image, position_ids=torch.arange(12)[None])
    assert query_positions(AttentionRows(queries="instruction"), inp, None).tolist() == [8, 9, 10, 11]
    assert query_positions(AttentionRows(queries="last"), inp, None).tolist() == [11]
    with pytest.raises(ValueError, match=r"llm_query_mask must return a \[12\] bool tensor"):
        query_positions(AttentionRows(queries="mask"), inp, torch.ones(12))


def test_the_depth_check_covers_every_stage():
    """The runners' pre-flight check (``check_llm_depth``) refuses any stage beyond the model's depth and
    names the method's own setting; SparseVLM prunes after its layers, so its stages run one later."""
    pdrop = build_compressor({"name": "pdrop", "layers": [1, 2, 4]})
    with pytest.raises(ValueError, match=r"compressor\.layers=\[1, 2, 4\] is beyond the model's depth: it has 4 "
                                         r"decoder layers \(0\.\.3\)"):
        pdrop.check_llm_depth(4)
    pdrop.check_llm_depth(5)
    sparsevlm = build_compressor({"name": "sparsevlm", "layers": [0, 1, 3]})
    with pytest.raises(ValueError, match=r"compressor\.layers=\[0, 1, 3\] .* stages run at decoder layers \[1, 2, 4\]"):
        sparsevlm.check_llm_depth(4)
    sparsevlm.check_llm_depth(5)
    with pytest.raises(ValueError, match=r"^compressor\.layer=4 is beyond .* below 4$"):
        build_compressor({"name": "dart", "layer": 4}).check_llm_depth(4)
    build_compressor({"name": "pdrop", "ratio": 1.0}).check_llm_depth(1)  # no stage at ratio 1: nothing to check


def test_the_hook_records_the_query_rows_of_every_attention_signal():
    """Instruction rows are the text after the image (6 here), the last token one row: what the cost
    model multiplies by (``StageRecord.query_rows``)."""
    from compressors import AttentionRows
    from tests.llm_reference import reference_model, run_with_cache

    instruction, last = AttentionRows(layer="stage", queries="instruction"), AttentionRows(queries="last")

    class Both(_Decides):
        llm_signals = (instruction, last)

    keep_all = Both(lambda inp: torch.arange(inp.image_mask.shape[1]), layers=(1, 3))
    run = run_with_cache(reference_model(4, 0), keep_all, 3, 10, 6, 0, 1)
    assert run.record.stage_query_rows == [{instruction: 6, last: 1}] * 2
