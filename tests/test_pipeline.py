"""The LLaVA-NeXT pipeline on the tiny model: equal to transformers, identity at ratio 1, signals on demand."""

from __future__ import annotations

import copy

import pytest
import torch

from compressors import ClsAttention, Compressor, VisionInput, VisionOutput, build_compressor, list_compressors
from compressors.registry import get_compressor_class
from models import build_pipeline
from models.loading import CheckpointError, check_checkpoint_dir
from models.vision import encode_tiles

QUESTION = "What color is the circle?\nAnswer the question using a single word or phrase."


def hf_generate_text(pipeline, image, max_new_tokens: int) -> tuple[list[int], str]:
    inputs = pipeline.processor_inputs(image, QUESTION)
    with torch.inference_mode():
        out = pipeline.model.generate(**inputs, generation_config=pipeline.generation_config(max_new_tokens))
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new, pipeline.processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_none_equals_transformers_generate(tiny, images):
    none = build_compressor({"name": "none"})
    for grid, image in images.items():
        result = tiny.generate(image, QUESTION, none, max_new_tokens=10)
        _, expected_text = hf_generate_text(tiny, image, 10)
        assert result.text == expected_text, grid
        assert result.new_tokens == 10
        assert f"{result.layout.rows}x{result.layout.cols}" == grid.split("-")[0]
        assert result.visual_tokens_before == result.visual_tokens_spliced == result.visual_tokens_after


def test_none_prefill_logits_equal_transformers_forward(tiny, images):
    for image in images.values():
        inputs = tiny.processor_inputs(image, QUESTION)
        with torch.inference_mode():
            expected = tiny.model(**inputs).logits
        got = tiny.prefill_logits(image, QUESTION, build_compressor({"name": "none"}))
        assert torch.equal(got, expected)


IDENTITY = [n for n in list_compressors() if get_compressor_class(n).identity_at_full_ratio]


@pytest.mark.parametrize("name", IDENTITY)
def test_full_ratio_reproduces_uncompressed_logits(tiny, images, name):
    reference = build_compressor({"name": "none"})
    for grid in ("2x2-padded", "1x3"):
        expected = tiny.prefill_logits(images[grid], QUESTION, reference)
        got = tiny.prefill_logits(images[grid], QUESTION, build_compressor({"name": name, "ratio": 1.0}))
        assert torch.equal(got, expected), (name, grid)


class _Probe(Compressor):
    """Asks for the last CLIP layer's [CLS] attention and records what it got."""

    def __init__(self, ratio: float = 1.0) -> None:
        super().__init__(ratio)
        self.seen: dict = {}

    @property
    def vision_signals(self):
        return (ClsAttention(layer=-1),)

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        self.seen = dict(inp.signals)
        return super().compress_vision(inp)


def test_signals_only_when_declared(tiny, images):
    model = tiny.model
    calls = []
    handle = model.model.vision_tower.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny.generate(images["1x2"], QUESTION, build_compressor({"name": "none"}), max_new_tokens=2)
        assert calls == [], "the last CLIP layer ran although nothing needs it (features come from layer -2)"
        probe = _Probe()
        tiny.generate(images["1x2"], QUESTION, probe, max_new_tokens=2)
        assert calls == [] and list(probe.seen) == [ClsAttention(-1)]
    finally:
        handle.remove()
    assert "forward" not in vars(model.model.language_model), "LLM-stage hook left installed"
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_cls_attention_equals_eager_attention(tiny, images):
    """softmax of the probe's logits == eager CLIP attention of the last layer, [CLS] row."""
    eager = copy.deepcopy(tiny.model)
    eager.config.vision_config._attn_implementation = "eager"
    inputs = tiny.processor_inputs(images["2x2"], QUESTION)
    tiles = inputs["pixel_values"][0, :5]
    with torch.inference_mode():
        _, signals = encode_tiles(tiny.model, tiles, [ClsAttention(-1), ClsAttention(0)])
        attentions = []
        hooks = [layer.self_attn.register_forward_hook(lambda m, a, out: attentions.append(out[1]))
                 for layer in eager.model.vision_tower.encoder.layers]
        eager.model.vision_tower(tiles)
        for h in hooks:
            h.remove()
    for request, layer_index in ((ClsAttention(-1), -1), (ClsAttention(0), 0)):
        expected = attentions[layer_index][:, :, 0, :]  # [T, H, 577]
        got = signals[request].softmax(dim=-1)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-6)


def test_bad_vision_signal_layer(tiny, images):
    tiles = tiny.processor_inputs(images["1x2"], QUESTION)["pixel_values"][0, :3]
    with pytest.raises(ValueError, match="ClsAttention layer 7 is out of range; allowed: -3..2"):
        encode_tiles(tiny.model, tiles, [ClsAttention(7)])


# -- real-checkpoint loading, exercised on the tiny model saved in llava-hf format ---------------


@pytest.fixture(scope="module")
def saved_tiny(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava-v1.6-tiny-hf")
    tiny.model.save_pretrained(directory)
    tiny.processor.save_pretrained(directory)
    return directory


def test_local_checkpoint_loads_and_matches(tiny, images, saved_tiny):
    pipeline = build_pipeline({"loader": "local", "name": "llava_next_7b", "path": str(saved_tiny),
                               "hub_id": "llava-hf/llava-v1.6-vicuna-7b-hf", "dtype": "float32",
                               "device_map": "cpu", "attn_implementation": "sdpa", "prompt_format": "vicuna_v1"})
    none = build_compressor({"name": "none"})
    expected = tiny.prefill_logits(images["2x1"], QUESTION, none)
    assert torch.equal(pipeline.prefill_logits(images["2x1"], QUESTION, none), expected)


def test_missing_checkpoint_says_what_to_download(tmp_path):
    target = tmp_path / "llava-v1.6-vicuna-7b-hf"
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_dir(target, "llava-hf/llava-v1.6-vicuna-7b-hf")
    message = str(err.value)
    assert str(target) in message and "does not exist" in message
    assert "huggingface-cli download llava-hf/llava-v1.6-vicuna-7b-hf" in message


def test_incomplete_checkpoint_lists_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"missing tokenizer_config.json, preprocessor_config.json, "
                                              r"\*\.safetensors"):
        check_checkpoint_dir(tmp_path, "llava-hf/llava-v1.6-mistral-7b-hf")


def test_wrong_model_type_is_rejected(saved_tiny, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(saved_tiny, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llava"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds a 'llava' checkpoint; expected 'llava_next'"):
        build_pipeline({"loader": "local", "name": "x", "path": str(other), "hub_id": "llava-hf/x",
                        "dtype": "float32", "device_map": "cpu"})


def test_unknown_loader_and_prompt_format(tiny):
    with pytest.raises(ValueError, match="allowed: tiny, local"):
        build_pipeline({"loader": "hub"})
    from models.pipeline import LlavaNextPipeline

    with pytest.raises(ValueError, match="allowed: vicuna_v1, mistral_instruct"):
        LlavaNextPipeline(tiny.model, tiny.processor, prompt_format="chatml")
