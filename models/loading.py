"""Load a real LLaVA-NeXT checkpoint (Hugging Face format) from a local directory, or fail clearly.

Nothing is downloaded: weights must already be on disk. transformers' own errors for a missing
local path are misleading ("Repo id must be in the form ..."), and a missing weight is only a
warning there (the tensor is randomly initialised), so both are checked here first.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "auto": "auto"}


class CheckpointError(FileNotFoundError):
    """A local checkpoint directory is missing or incomplete."""


def _download_hint(path: Path, hub_id: str) -> str:
    return (
        f"Download the Hugging Face-format checkpoint {hub_id!r} on a machine with internet and copy it to "
        f"{path}, e.g.:\n    huggingface-cli download {hub_id} --local-dir {path}\n"
        f"or point model.path at the directory that holds it."
    )


def check_checkpoint_dir(path: str | Path, hub_id: str) -> Path:
    """Raise ``CheckpointError`` naming what is missing and what to download; return the path."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model.path {str(path)!r} does not exist or is not a directory.\n"
                              + _download_hint(path, hub_id))
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (path / name).is_file()]
    if not ((path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()):
        missing.append("preprocessor_config.json")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    if not has_weights:
        missing.append("*.safetensors (or pytorch_model*.bin) weights")
    if missing:
        raise CheckpointError(f"model.path {str(path)!r} is incomplete: missing {', '.join(missing)}.\n"
                              + _download_hint(path, hub_id))
    return path


def resolve_dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown model.dtype {name!r}; allowed: {', '.join(DTYPES)}") from None


def load_llava_next(
    path: str | Path,
    hub_id: str,
    dtype: str = "float16",
    device_map: str | dict | None = "auto",
    attn_implementation: str = "sdpa",
):
    """Model (eval mode) and processor from a local llava-hf directory.

    The processor's image side is transformers' PIL implementation (as the original LLaVA, which
    resizes with PIL), whichever backend is installed.
    """
    from transformers import AutoConfig, AutoTokenizer, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    path = check_checkpoint_dir(path, hub_id)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != "llava_next":
        raise ValueError(
            f"model.path {str(path)!r} holds a {config.model_type!r} checkpoint; expected 'llava_next' "
            f"(e.g. {hub_id!r})"
        )
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        path, dtype=resolve_dtype(dtype), device_map=device_map, attn_implementation=attn_implementation,
        local_files_only=True, output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match LLaVA-NeXT: {bad}.\n"
                              + _download_hint(path, hub_id))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = LlavaNextImageProcessorPil.from_pretrained(path, local_files_only=True)
    processor = LlavaNextProcessor.from_pretrained(path, local_files_only=True, tokenizer=tokenizer,
                                                   image_processor=image_processor)
    return model.eval(), processor
