"""The LLM-stage hook in real deployments: pre-existing forwards kept, accelerate dispatch, output
flags, no-mask/no-cache calls, checked selections, and the token accounting every table reads."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from compressors import Compressor, LLMSignal, build_compressor
from compressors.packing import spatial_source_order
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

    with pytest.raises(ValueError, match="unknown LLM signal .*Mystery.*can compute: AttentionRows, DecoderKeys, DecoderOutput, PromptEmbeddings"):
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
