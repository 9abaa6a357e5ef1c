"""FastV against its definition: selection by hand, the authors' rounding, and decoding with the KV cache
checked step by step against an independent cache-free token-mask reference."""

from __future__ import annotations

import copy

import pytest
import torch

from compressors import build_compressor
from compressors.fastv import fastv_keep_count, fastv_select
from models.llm_stage import LLMStagePruning
from tests.conftest import masked_reference_logits

QUESTION = "How many squares are there?\nAnswer the question using a single word or phrase."


def test_selection_by_hand():
    # 10 positions: text 0-1, image 2-7, text 8-9. Head-mean attention from the last token:
    #   head 0: [.0 .0 .1 .4 .0 .2 .0 .1 .1 .1]   head 1: [.0 .0 .3 .0 .0 .2 .2 .1 .1 .1]
    #   mean on image positions 2..7: [.2 .2 .0 .2 .1 .1] -> keep round(6 * 0.5) = 3: positions 2, 3, 5
    attention = torch.tensor([[0, 0, .1, .4, 0, .2, 0, .1, .1, .1], [0, 0, .3, 0, 0, .2, .2, .1, .1, .1]])
    image_mask = torch.zeros(10, dtype=torch.bool)
    image_mask[2:8] = True
    assert fastv_select(attention, image_mask, 0.5).tolist() == [0, 1, 2, 3, 5, 8, 9]
    assert fastv_select(attention, image_mask, 1.0).tolist() == list(range(10))
    # one token: the single best image token (2, 3 and 5 tie at .2 -> any of them), plus all text
    one = fastv_select(attention, image_mask, 1 / 6).tolist()
    assert one[:2] == [0, 1] and one[-2:] == [8, 9] and one[2] in (2, 3, 5) and len(one) == 5


def test_keep_count_follows_the_authors_arithmetic():
    # authors: round(L * (1 - R)) with R the dropped fraction; here R = 1 - r in floats.
    assert fastv_keep_count(2928, 0.5) == 1464
    assert fastv_keep_count(1752, 0.25) == 438
    assert fastv_keep_count(15, 0.1) == 1  # 1 - 0.9 = 0.0999..., so 15 * it = 1.4999... -> 1 (not round(1.5) = 2)
    assert fastv_keep_count(5, 0.1) == 0  # Python's round(0.5) = 0


def test_bad_layer_values():
    for bad in (0, -1, 2.5, "2", True):
        with pytest.raises(ValueError, match="compressor.layer"):
            build_compressor({"name": "fastv", "layer": bad})


def test_layer_out_of_range_for_the_model(tiny, images):
    with pytest.raises(ValueError, match=r"llm_layer must be in 1..3"):
        tiny.generate(images["1x2"], QUESTION, build_compressor({"name": "fastv", "layer": 4}), 2)


def test_attention_row_equals_eager(tiny, images):
    eager = copy.deepcopy(tiny.model)
    eager.config.text_config._attn_implementation = "eager"
    inputs = tiny.processor_inputs(images["2x1"], QUESTION)
    image_mask = inputs["input_ids"] == tiny.image_token_id
    seen = {}

    class Spy(type(build_compressor({"name": "fastv"}))):
        def select_llm_tokens(self, inp):
            seen["attention"] = inp.signals[self.llm_signals[0]][:, :, -1]  # [1, H, L]
            return super().select_llm_tokens(inp)

    with torch.inference_mode():
        reference = eager(**inputs, output_attentions=True).attentions[1][:, :, -1]  # layer K-1 = 1
        with LLMStagePruning(tiny.model.model.language_model, Spy(ratio=0.5, layer=2), image_mask):
            tiny.model(**inputs)
    assert torch.allclose(seen["attention"], reference, atol=1e-8)


@pytest.mark.parametrize("ratio", [0.5, 0.1])
def test_cached_decoding_equals_cache_free_masked_recomputation(tiny, images, ratio):
    model = tiny.model
    fastv = build_compressor({"name": "fastv", "ratio": ratio, "layer": 2})
    prepared = tiny.prepare(images["2x2-padded"], QUESTION, fastv)
    steps = 8
    with torch.inference_mode():
        stage = tiny.llm_stage(fastv, prepared)
        with stage:
            out = model.generate(**tiny.model_inputs(prepared), generation_config=tiny.generation_config(steps),
                                 output_logits=True, return_dict_in_generate=True)
        record = stage.record
        prompt = prepared.input_ids
        length = prompt.shape[1]
        generated = out.sequences[0, length:]
        # KV cache: layers < K hold every position, layers >= K only the kept ones (+ new tokens)
        cache_lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        kept = record.keep.numel()
        assert cache_lengths == [length + steps - 1] * 2 + [kept + steps - 1] * 2
        assert record.layer_lengths == [length, length, kept, kept]
        assert record.kept_image_tokens == fastv_keep_count(prepared.segment.num_tokens, ratio)

        embeds = model.get_input_embeddings()(out.sequences[:, :-1])
        image = prompt[0] == tiny.image_token_id
        embeds[0, :length][image] = prepared.segment.embeds
        reference = masked_reference_logits(model, embeds, record.keep, length, layer_k=2)
    for step in range(steps):
        expected = reference[0, length - 1 + step]
        assert torch.allclose(out.logits[step][0], expected, atol=1e-4), step
        assert int(expected.argmax()) == int(generated[step])


def test_kept_tokens_keep_their_original_positions(tiny, images):
    """The pruned prefill equals the masked reference, in which every token keeps its original position id."""
    fastv = build_compressor({"name": "fastv", "ratio": 0.25})
    prepared = tiny.prepare(images["1x3"], QUESTION, fastv)
    with torch.inference_mode():
        stage = tiny.llm_stage(fastv, prepared)
        with stage:
            logits = tiny.model(**tiny.model_inputs(prepared)).logits[0, -1]
        embeds = tiny.model.get_input_embeddings()(prepared.input_ids)
        image = prepared.input_ids[0] == tiny.image_token_id
        embeds[0][image] = prepared.segment.embeds
        reference = masked_reference_logits(tiny.model, embeds, stage.record.keep, prepared.input_ids.shape[1], 2)
    assert torch.allclose(logits, reference[0, -1], atol=1e-4)


@pytest.mark.parametrize("sliding_window", [None, 4096])
def test_mistral_decoder(images, sliding_window):
    """llava-v1.6-mistral's decoder (MistralModel): none == transformers, FastV r=1 is the identity,
    and cached FastV decoding matches the masked reference."""
    from models.pipeline import LlavaNextPipeline
    from models.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=1, text_model="mistral", sliding_window=sliding_window)
    assert type(model.model.language_model).__name__ == "MistralModel"
    pipeline = LlavaNextPipeline(model, processor, prompt_format="mistral_instruct")
    image = images["1x2"]
    inputs = pipeline.processor_inputs(image, QUESTION)
    with torch.inference_mode():
        expected = model(**inputs).logits
    assert torch.equal(pipeline.prefill_logits(image, QUESTION, build_compressor({"name": "none"})), expected)
    assert torch.equal(pipeline.prefill_logits(image, QUESTION, build_compressor({"name": "fastv", "ratio": 1.0})),
                       expected)
    fastv = build_compressor({"name": "fastv", "ratio": 0.25})
    prepared = pipeline.prepare(image, QUESTION, fastv)
    with torch.inference_mode():
        stage = pipeline.llm_stage(fastv, prepared)
        with stage:
            out = model.generate(**pipeline.model_inputs(prepared), generation_config=pipeline.generation_config(4),
                                 output_logits=True, return_dict_in_generate=True)
        length = prepared.input_ids.shape[1]
        embeds = model.get_input_embeddings()(out.sequences[:, :-1])
        embeds[0, :length][prepared.input_ids[0] == pipeline.image_token_id] = prepared.segment.embeds
        reference = masked_reference_logits(model, embeds, stage.record.keep, length, layer_k=2)
    for step in range(4):
        assert torch.allclose(out.logits[step][0], reference[0, length - 1 + step], atol=1e-4), step


def _eager_rows(seed: int, num_layers: int, embeds: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s attention probabilities ``[H, n, n]`` from an eager twin of the reference model."""
    from tests.llm_reference import one_thread, reference_model

    eager = reference_model(num_layers, seed, attn_implementation="eager")
    with torch.no_grad(), one_thread():
        return eager(inputs_embeds=embeds, output_attentions=True).attentions[layer][0]


def test_reselect_recompute_is_fastv_on_every_grown_sequence():
    """The authors' no-cache path: every forward is a prefill of the whole sequence, which re-selects by
    its newest token. Each forward's last state equals the masked reference of that forward's own
    selection (from an eager twin's attention)."""
    from tests.llm_reference import image_mask, masked_forward, one_thread, reference_inputs, reference_model

    prefix, n_img, suffix, steps, seed = 4, 40, 6, 3, 7
    length = prefix + n_img + suffix
    model = reference_model(4, seed)
    embeds, new = reference_inputs(seed, length, steps)
    embeds = torch.cat([embeds, new[None]], dim=1)  # the prompt, then the tokens "generated"
    fastv = build_compressor({"name": "fastv", "ratio": 0.25, "decode": "reselect_recompute"})
    rows = _eager_rows(seed, 4, embeds, layer=1)
    image = torch.zeros(embeds.shape[1], dtype=torch.bool)
    image[prefix:prefix + n_img] = True
    got = []
    with torch.no_grad(), one_thread(), LLMStagePruning(model, fastv, image_mask(prefix, n_img, suffix)) as stage:
        assert stage.generate_kwargs == {"use_cache": False}
        for step in range(steps + 1):
            got.append(model(inputs_embeds=embeds[:, :length + step], use_cache=False).last_hidden_state[0, -1])
    assert stage.record.recompute_steps == steps
    assert stage.record.layer_image_tokens == [n_img] * 2 + [10] * 2  # the prompt's prefill: 40 / 4
    for step in range(steps + 1):
        n = length + step
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[fastv_select(rows[:, n - 1, :n], image[:n], 0.25)] = True
        late = (torch.ones(n, n, dtype=torch.bool).tril() & allowed) | torch.eye(n, dtype=torch.bool)
        expected = masked_forward(model, embeds[:, :n], late, layer_k=2)[0, -1]
        assert torch.allclose(got[step], expected, atol=1e-10, rtol=0), step


def test_reselect_mask_is_a_key_mask_chosen_by_each_forwards_token():
    """The original FastV's token-mask path with a KV cache: nothing is removed; the prefill and every
    decode step select by their own last token, and layers >= K see the other image tokens masked as
    keys. Cache-free, that is one pass where every query row uses the selection of the forward that
    computed it (the prompt rows: the prefill's; a decoded row: its own step's)."""
    from tests.llm_reference import masked_forward, reference_model, run_with_cache

    prefix, n_img, suffix, steps, seed = 4, 40, 6, 4, 8
    length = prefix + n_img + suffix
    model = reference_model(4, seed)
    fastv = build_compressor({"name": "fastv", "ratio": 0.25, "decode": "reselect_mask"})
    run = run_with_cache(model, fastv, prefix, n_img, suffix, seed, steps)
    n = length + steps
    assert run.cache_lengths == [length] * 4  # every token kept
    assert run.record.layer_image_tokens == [40, 40, 10, 10]  # what layers attend to
    rows = _eager_rows(seed, 4, run.embeds, layer=1)
    image = torch.zeros(n, dtype=torch.bool)
    image[prefix:prefix + n_img] = True
    late = torch.zeros(n, n, dtype=torch.bool)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    selections = []
    for query in range(length - 1, n):
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[fastv_select(rows[:, query, :query + 1], image[:query + 1], 0.25)] = True
        block = slice(0, length) if query == length - 1 else slice(query, query + 1)
        late[block] = allowed[None, :] & causal[block]
        selections.append(allowed[image])
    assert any(not torch.equal(s, selections[0]) for s in selections[1:])  # the selection moves
    expected = masked_forward(model, run.embeds, late, layer_k=2)[0]
    assert torch.allclose(run.prefill_hidden, expected[:length], atol=1e-10, rtol=0)
    assert torch.allclose(run.decode_hidden, expected[length:], atol=1e-10, rtol=0)


def test_the_pipeline_generates_without_a_cache_for_reselect_recompute(tiny, images, monkeypatch):
    """The evaluator's generate and the efficiency runner's decode timing both run the mode's way."""
    from runners.efficiency import MethodBench

    seen, original = [], tiny.model.generate

    def generate(**kwargs):
        seen.append(kwargs["generation_config"].use_cache)
        return original(**kwargs)

    monkeypatch.setattr(tiny.model, "generate", generate)
    fastv = build_compressor({"name": "fastv", "decode": "reselect_recompute"})
    result = tiny.generate(images["1x2"], QUESTION, fastv, 1)
    assert seen == [False] and result.visual_tokens_after == fastv_keep_count(result.visual_tokens_spliced, 0.5)
    bench = object.__new__(MethodBench)  # only what its decode timing reads
    bench.pipeline, bench.compressor, bench.clock = tiny, fastv, None
    bench.prepared, bench.generation_config = tiny.prepare(images["1x2"], QUESTION, fastv), tiny.generation_config(2)
    monkeypatch.setattr(tiny.model, "generate", lambda **kwargs: seen.append(kwargs["generation_config"].use_cache)
                        or 1 / 0)  # stop there: the configuration is what is checked
    with pytest.raises(ZeroDivisionError):
        bench.decode()
    assert seen == [False, False] and bench.generation_config.use_cache is not False  # the base config is kept


def test_score_dtype_model_is_eager_attentions_arithmetic():
    """``score_dtype=model``: q.k in bf16 and the float32 softmax rounded back, as transformers' eager
    attention (the authors' path) computes it; ``float32`` differs at the bf16 rounding."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from models.llm_signals import attention_probs

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 7, 16, generator=gen).bfloat16()
    k = torch.randn(1, 2, 7, 16, generator=gen).bfloat16()
    module = SimpleNamespace(num_key_value_groups=2, training=False, scaling=16 ** -0.5)
    causal = torch.zeros(7, 7).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -1e30).bfloat16()
    _, weights = eager_attention_forward(module, q, k, torch.zeros_like(k), causal[None, None], scaling=module.scaling)
    rows = torch.tensor([2, 6])
    model = attention_probs(module, q[:, :, rows], k, rows, None, "model")
    assert model.dtype == torch.bfloat16 and torch.equal(model, weights[:, :, rows])
    float32 = attention_probs(module, q[:, :, rows], k, rows, None, "float32")
    assert float32.dtype == torch.float32 and not torch.equal(float32, model.float())
    assert build_compressor({"name": "fastv", "score_dtype": "model"}).llm_signals[0].dtype == "model"
    for key, bad in (("score_dtype", "fp16"), ("decode", "every_step")):
        with pytest.raises(ValueError, match=rf"compressor.{key} must be one of"):
            build_compressor({"name": "fastv", key: bad})
