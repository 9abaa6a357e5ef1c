"""Local checkpoints: damaged files get the same clear error as missing ones, and one identity rule
(the checkpoint's fingerprint, never its path) decides which runs a checkpoint's results belong to."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from models import describe_model
from models.loading import CheckpointError, check_checkpoint_dir, checkpoint_fingerprint
from runners.evaluate import prepare_run
from runners.store import RunMismatchError, RunStore

HUB_ID = "llava-hf/llava-v1.6-vicuna-7b-hf"


def fake_checkpoint(directory, seed: int = 0, text_layers: int = 3):
    """The files a llava-hf directory must have, with a small random weight file (no model built)."""
    directory.mkdir(parents=True)
    config = {"model_type": "llava_next", "text_config": {"model_type": "llama", "num_hidden_layers": text_layers}}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text("{}")
    (directory / "preprocessor_config.json").write_text("{}")
    generator = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(64, 64, generator=generator)}, str(directory / "model.safetensors"))
    return directory


def model_cfg(path) -> dict:
    return {"name": "llava_next_7b", "loader": "local", "path": str(path), "hub_id": HUB_ID, "dtype": "float32",
            "device_map": "cpu", "attn_implementation": "sdpa", "prompt_format": "vicuna_v1"}


def assert_clear(error: CheckpointError, path, name: str) -> None:
    message = str(error)
    assert str(path) in message and name in message
    assert f"huggingface-cli download {HUB_ID} --local-dir {path}" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_weight_file_gets_the_clear_error(tmp_path, damage):
    path = fake_checkpoint(tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"garbage": b"\x89junk" * 100, "truncated": data[:-1000], "empty": b""}[damage])
    with pytest.raises(CheckpointError) as error:
        check_checkpoint_dir(path, HUB_ID)
    assert_clear(error.value, path, "damaged model.safetensors")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_a_damaged_json_file_gets_the_clear_error(tmp_path, name):
    path = fake_checkpoint(tmp_path / "ckpt")
    (path / name).write_text('{"model_type": "llava_ne')  # cut short
    with pytest.raises(CheckpointError) as error:
        describe_model(model_cfg(path))
    assert_clear(error.value, path, f"damaged {name} (not valid JSON")


def test_a_shard_listed_in_the_index_but_absent_is_missing(tmp_path):
    path = fake_checkpoint(tmp_path / "ckpt")
    index = {"weight_map": {"w": "model.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        check_checkpoint_dir(path, HUB_ID)
    assert_clear(error.value, path, "missing model-00002-of-00002.safetensors (listed in model.safetensors.index.json)")


def test_the_depth_comes_from_the_config_without_weights(tmp_path):
    facts = describe_model(model_cfg(fake_checkpoint(tmp_path / "ckpt", text_layers=3)))
    assert facts.num_decoder_layers == 3
    (tmp_path / "defaults").mkdir()  # llava-hf's config.json leaves out the Llama default depth (32)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "defaults" / "ckpt")
    config_path = tmp_path / "defaults" / "ckpt" / "config.json"
    config_path.write_text(json.dumps({"model_type": "llava_next", "text_config": {"model_type": "llama"}}))
    assert describe_model(model_cfg(config_path.parent)).num_decoder_layers == 32


def test_fastv_beyond_a_checkpoint_depth_is_refused_before_loading(tmp_path, compose_cfg):
    """The depth is read from config.json (the fake checkpoint's weights could not even load)."""
    path = fake_checkpoint(tmp_path / "ckpt", text_layers=3)

    def cfg(layer: int):
        return compose_cfg(["model=llava_next_7b", f"model.path={path}", "compressor=fastv",
                            f"compressor.layer={layer}", f"paths.output_dir={tmp_path / 'out'}"])

    with pytest.raises(ValueError, match=r"compressor\.layer=3 is beyond the model's depth: it has 3 decoder"):
        prepare_run(cfg(3))
    assert prepare_run(cfg(2)).model.num_decoder_layers == 3
    assert not (tmp_path / "out").exists()


def test_the_fingerprint_follows_content_not_place(tmp_path):
    original = fake_checkpoint(tmp_path / "a")
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(original, copy)
    other = fake_checkpoint(tmp_path / "c", seed=1)  # same architecture, other weights (a fine-tune)
    assert checkpoint_fingerprint(original) == checkpoint_fingerprint(copy) != checkpoint_fingerprint(other)


def test_a_moved_checkpoint_resumes_and_another_one_is_refused(tmp_path, compose_cfg):
    """The rule: model.path is neither in the run directory's name nor in the identity; the
    checkpoint's fingerprint is in the identity. Same run directory for all three."""
    original = fake_checkpoint(tmp_path / "a")
    moved = tmp_path / "moved"
    shutil.move(str(fake_checkpoint(tmp_path / "tmp")), moved)
    other = fake_checkpoint(tmp_path / "c", seed=1)

    def plan(path):
        return prepare_run(compose_cfg(["model=llava_next_7b", f"model.path={path}",
                                        f"paths.output_dir={tmp_path / 'out'}"]))

    first, same, different = plan(original), plan(moved), plan(other)
    assert first.directory == same.directory == different.directory
    assert "path" not in first.identity["model"] and str(original) not in json.dumps(first.identity)
    with RunStore(first.directory, first.identity) as store:
        store.append({"id": "s0", "score": 1.0})
    RunStore(same.directory, same.identity).close()  # a moved copy: same identity, resumes
    with pytest.raises(RunMismatchError, match=r"model\.checkpoint: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        RunStore(different.directory, different.identity)
