"""Structured-config schemas: Hydra checks types and keys against these at compose time.

Registered in Hydra's ConfigStore on import; ``conf/config.yaml`` and the model YAMLs name them
in their ``defaults`` lists, so a typo (``model.dtpye``) or a wrong type (``resume=maybe``) fails
before anything is loaded. Compressor and benchmark keys are checked against the registered
class's constructor instead (``build_compressor`` / ``build_benchmark``), so a new method needs no
schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class DType(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"
    auto = "auto"


class PromptFormat(str, Enum):
    vicuna_v1 = "vicuna_v1"
    mistral_instruct = "mistral_instruct"


class AttnImplementation(str, Enum):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"
    flex_attention = "flex_attention"


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    checkpoint_dir: str = "checkpoints"
    data_dir: str = "data"


@dataclass
class TinyModelConfig:
    """The embedded random-weight LLaVA-NeXT (CPU, float32)."""

    name: str = "tiny"
    loader: str = "tiny"
    seed: int = 0
    vision_layers: int = 3
    text_layers: int = 4
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    prompt_format: PromptFormat = PromptFormat.vicuna_v1


@dataclass
class LocalModelConfig:
    """A llava-hf checkpoint in a local directory."""

    name: str = MISSING
    loader: str = "local"
    path: str = MISSING
    hub_id: str = MISSING  # what to download when ``path`` is missing
    dtype: DType = DType.float16
    device_map: Any = "auto"  # accelerate device_map: "auto", "cpu", "cuda:0", or a dict
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    prompt_format: PromptFormat = PromptFormat.vicuna_v1


@dataclass
class EvaluateConfig:
    """``runners.evaluate``: model x compressor x benchmark, one run directory per combination."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: Any = MISSING
    compressor: Any = MISSING
    benchmark: Any = MISSING
    resume: bool = True  # skip samples already in samples.jsonl (the config must match)
    progress: bool = True  # rich progress bar
    save_provenance: bool = False  # store which source tokens each kept token came from
    num_threads: Optional[int] = None  # torch CPU threads; None = torch's default


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(group="model", name="tiny_schema", node=TinyModelConfig)
    store.store(group="model", name="local_schema", node=LocalModelConfig)


register_schemas()
