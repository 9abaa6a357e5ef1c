"""Real LLaVA-NeXT architectures with random weights, for timing where no checkpoint exists.

``model.random_init=true`` on a local model config (``model=llava_next_7b``, ``llava_next_13b``,
``llava_next_mistral_7b``) builds that checkpoint's architecture from the config shipped in
``models/configs/`` (named after ``model.hub_id``) with random weights: the real shapes (CLIP
ViT-L/14-336, the projector, the Vicuna or Mistral decoder, the 32,064-token vocabulary), so
speed and memory are measured without the weights. The outputs are meaningless.

``text_layers`` builds fewer decoder layers than the real model (a CPU cannot hold 7B in float32);
the cost model then describes the built depth, and reports say so. Before anything is allocated,
``check_fits`` compares the parameter bytes with the memory the target device has free and
refuses with a message that says what to change.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from models.tiny import build_tiny_processor, build_tiny_tokenizer

CONFIG_DIR = Path(__file__).with_name("configs")
# Memory beyond the weights that a prefill of a few thousand tokens needs (activations, KV cache,
# allocator slack), as a fraction of the weight bytes; generous on purpose.
HEADROOM = 0.25


def _config_file(hub_id: str) -> Path:
    return CONFIG_DIR / (hub_id.replace("/", "--") + ".json")


def shipped_architectures() -> list[str]:
    """Hub ids whose architecture ships with vtclab (``models/configs/<owner>--<name>.json``)."""
    return sorted(p.stem.replace("--", "/", 1) for p in CONFIG_DIR.glob("*.json"))


@functools.lru_cache(maxsize=16)
def _parsed(path: Path) -> LlavaNextConfig:
    return LlavaNextConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def shipped_config(hub_id: str, text_layers: int | None = None) -> LlavaNextConfig:
    """The shipped ``LlavaNextConfig`` of ``hub_id`` (a fresh copy), optionally cut to ``text_layers``
    decoder layers.

    A hub id without a shipped config fails, naming the shipped ones and how to add one.
    """
    path = _config_file(hub_id)
    if not path.is_file():
        raise ValueError(
            f"model.random_init=true needs the architecture of {hub_id!r}, and none ships with vtclab "
            f"(looked for {path}). Random-init shapes: {', '.join(shipped_architectures())}. To add one, "
            f"copy that checkpoint's config.json to {path.name} in {CONFIG_DIR}."
        )
    config = copy.deepcopy(_parsed(path))
    if text_layers is not None:
        depth = config.text_config.num_hidden_layers
        if isinstance(text_layers, bool) or not isinstance(text_layers, int) or not 1 <= text_layers <= depth:
            raise ValueError(f"model.text_layers must be an integer in 1..{depth} for {hub_id!r} "
                             f"(its depth), got {text_layers!r}")
        config.text_config.num_hidden_layers = text_layers
    return config


def parameter_count(config: LlavaNextConfig) -> int:
    """Exact parameter count of the model ``config`` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration._from_config(config)
    return sum(p.numel() for p in model.parameters())


def available_bytes(device: torch.device) -> int:
    """Memory free for a new model on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(config: LlavaNextConfig, dtype: torch.dtype, device: torch.device, name: str,
               available: int | None = None) -> int:
    """Refuse (``MemoryError`` with what to change) when the model would not fit; return its bytes."""
    params = parameter_count(config)
    needed = params * torch.finfo(dtype).bits // 8
    free = available_bytes(device) if available is None else available
    if needed * (1 + HEADROOM) > free:
        layers = config.text_config.num_hidden_layers
        raise MemoryError(
            f"building {name} with random weights ({layers} decoder layers, {params / 1e9:.2f} B parameters) "
            f"in {str(dtype).removeprefix('torch.')} needs {needed / 1e9:.1f} GB for the weights plus "
            f"{HEADROOM:.0%} headroom, and {device} has {free / 1e9:.1f} GB free. Build fewer decoder layers "
            f"(model.text_layers=2), use a smaller dtype (model.dtype=bfloat16), or run on a GPU "
            f"(model.device_map=cuda:0)."
        )
    return needed


def random_init_device(device_map) -> torch.device:
    """The one device a random-init model is built on: ``model.device_map`` as a device, where
    ``auto`` is the first GPU if there is one, else the CPU."""
    if device_map in (None, "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not isinstance(device_map, str):
        raise ValueError(f"model.random_init=true builds on one device; model.device_map must be 'auto' or a "
                         f"device such as 'cuda:0' or 'cpu', got {device_map!r}")
    device = torch.device(device_map)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device_map={device_map!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def build_random_llava_next(hub_id: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                            text_layers: int | None = None, seed: int = 0, attn_implementation: str = "sdpa",
                            check_memory: bool = True):
    """A random-weight model of ``hub_id``'s architecture on ``device`` (eval mode), and the tiny
    model's processor (the same AnyRes geometry; its tokenizer's ids all fit the full vocabulary)."""
    device = torch.device(device)
    config = shipped_config(hub_id, text_layers)
    if check_memory:
        check_fits(config, dtype, device, hub_id)
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with fork, torch.device(device):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype,
                                                               attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), processor
