"""Load a real LLaVA-NeXT checkpoint (Hugging Face format) from a local directory, or fail clearly.

Nothing is downloaded: weights must already be on disk. transformers' own errors for a missing
local path are misleading ("Repo id must be in the form ..."), and a missing weight is only a
warning there (the tensor is randomly initialised), so both are checked here first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vtclab.errors import ConfigError, UsageError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "auto": "auto"}


class CheckpointError(UsageError, FileNotFoundError):
    """A local checkpoint directory is missing, incomplete or damaged."""


def _download_hint(path: Path, hub_id: str | None, rebuild: str | None = None) -> str:
    if rebuild:  # a checkpoint built by vtclab itself (e.g. the shipped tiny_trained)
        return (f"This checkpoint is built, not downloaded: restore {path} from git, or rebuild it with\n"
                f"    {rebuild}\nor point model.path at the directory that holds it.")
    return (
        f"Download the Hugging Face-format checkpoint {hub_id!r} on a machine with internet and copy it to "
        f"{path}, e.g.:\n    huggingface-cli download {hub_id} --local-dir {path}\n"
        f"or point model.path at the directory that holds it."
    )


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
JSON_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "special_tokens_map.json", "generation_config.json",
              "model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, sorted by name."""
    return sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)})


def _damaged(path: Path, hub_id: str | None, name: str, reason: str, rebuild: str | None = None) -> CheckpointError:
    return CheckpointError(f"model.path {str(path)!r} has a damaged {name} ({reason}); it was probably cut "
                           f"short by a failed download or copy. Fetch it again.\n"
                           + _download_hint(path, hub_id, rebuild))


def _check_weight_file(path: Path, hub_id: str | None, file: Path, rebuild: str | None = None) -> None:
    """Open the file's index without reading its tensors: safetensors checks its header and that the
    data covers every tensor; a torch ``.bin`` is a zip whose directory sits at the end of the file."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise _damaged(path, hub_id, file.name, str(error), rebuild) from None
    else:
        import zipfile

        if not zipfile.is_zipfile(file):
            raise _damaged(path, hub_id, file.name, "not a complete torch zip archive", rebuild)


def check_checkpoint_dir(path: str | Path, hub_id: str | None, rebuild: str | None = None) -> Path:
    """Raise ``CheckpointError`` naming what is missing or damaged and what to download; return the path.

    Cheap: reads the JSON files and the weight files' headers, never the weights themselves.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model.path {str(path)!r} does not exist or is not a directory.\n"
                              + _download_hint(path, hub_id, rebuild))
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (path / name).is_file()]
    if not ((path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()):
        missing.append("preprocessor_config.json")
    weights = weight_files(path)
    if not weights:
        missing.append("*.safetensors (or pytorch_model*.bin) weights")
    if missing:
        raise CheckpointError(f"model.path {str(path)!r} is incomplete: missing {', '.join(missing)}.\n"
                              + _download_hint(path, hub_id, rebuild))
    for name in JSON_FILES:
        if (path / name).is_file():
            try:
                content = json.loads((path / name).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise _damaged(path, hub_id, name, f"not valid JSON: {error}", rebuild) from None
            if not isinstance(content, dict):
                raise _damaged(path, hub_id, name, "not a JSON object", rebuild)
            shards = sorted(set(content.get("weight_map", {}).values())) if name.endswith(".index.json") else []
            absent = [shard for shard in shards if not (path / shard).is_file()]
            if absent:
                raise CheckpointError(f"model.path {str(path)!r} is incomplete: missing {', '.join(absent)} "
                                      f"(listed in {name}).\n" + _download_hint(path, hub_id, rebuild))
    for file in weights:
        _check_weight_file(path, hub_id, file, rebuild)
    return path


def read_checkpoint_config(path: str | Path, hub_id: str | None, rebuild: str | None = None) -> dict:
    """The checked checkpoint's ``config.json`` (no weights read); refuses a non-LLaVA-NeXT one."""
    path = check_checkpoint_dir(path, hub_id, rebuild)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llava_next":
        raise ConfigError(
            f"model.path {str(path)!r} holds a {config.get('model_type')!r} checkpoint; expected 'llava_next'"
            + (f" (e.g. {hub_id!r})" if hub_id else "")
        )
    return config


FINGERPRINT_SPAN = 1 << 20  # bytes read from each end of every weight file


def checkpoint_fingerprint(path: str | Path) -> str:
    """What identifies a checkpoint, wherever it lies: sha256 over ``config.json`` and, for every
    weight file, its name, size and first and last MiB (header and the first and last tensors).

    A moved or copied checkpoint keeps its fingerprint; another checkpoint, even one with the same
    architecture (a fine-tune), gets another. Reads a few MiB, not the weights.
    """
    path = Path(path).expanduser()
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_SPAN))
            handle.seek(max(size - FINGERPRINT_SPAN, 0))
            digest.update(handle.read(FINGERPRINT_SPAN))
    return digest.hexdigest()


def resolve_dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown model.dtype {name!r}; allowed: {', '.join(DTYPES)}") from None


def load_llava_next(
    path: str | Path,
    hub_id: str | None,
    dtype: str = "float16",
    device_map: str | dict | None = "auto",
    attn_implementation: str = "sdpa",
    max_memory: dict | None = None,
    rebuild: str | None = None,
):
    """Model (eval mode) and processor from a local llava-hf directory (``max_memory``: the devices
    ``device_map=auto`` may use, as accelerate takes it).

    The processor's image side is transformers' PIL implementation (as the original LLaVA, which
    resizes with PIL), whichever backend is installed.
    """
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    read_checkpoint_config(path, hub_id, rebuild)  # checks every file first: a clear error, not a loader traceback
    path = Path(path).expanduser()
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        path, dtype=resolve_dtype(dtype), device_map=device_map, attn_implementation=attn_implementation,
        local_files_only=True, output_loading_info=True, **({"max_memory": max_memory} if max_memory else {}),
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match LLaVA-NeXT: {bad}.\n"
                              + _download_hint(path, hub_id, rebuild))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = LlavaNextImageProcessorPil.from_pretrained(path, local_files_only=True)
    processor = LlavaNextProcessor.from_pretrained(path, local_files_only=True, tokenizer=tokenizer,
                                                   image_processor=image_processor)
    return model.eval(), processor
