"""Structured-config schemas: Hydra checks types and keys against these at compose time.

Registered in Hydra's ConfigStore on import, as top-level configs (not in the ``model`` or ``cost``
group, so ``model=...`` never offers them); ``conf/config.yaml`` and the group YAMLs extend them from
their ``defaults`` lists (``- /local_model_schema@_here_``), so a typo (``model.dtpye``) or a wrong type
(``resume=maybe``) fails before anything is loaded. A ``???`` left unset is refused by name when
the run starts. Compressor and benchmark keys are checked against the registered
class's constructor instead (``build_compressor`` / ``build_benchmark``), so a new method needs no
schema.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from models.cost import CostConvention
import runners.resolvers  # noqa: F401,E402  (${vtclab_weights:...} in conf/model/tiny_trained.yaml)


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
    image_size: Optional[int] = None  # resize every image to this square first (672: the papers' 2x2 grid)


@dataclass
class LocalModelConfig:
    """A llava-hf checkpoint in a local directory."""

    name: str = MISSING
    loader: str = "local"
    path: str = MISSING
    hub_id: Optional[str] = MISSING  # what to download when ``path`` is missing (null: built, not downloaded)
    rebuild: Optional[str] = None  # for a checkpoint vtclab builds: the command that rebuilds it
    dtype: DType = DType.float16
    device_map: Any = "auto"  # accelerate device_map: "auto", "cpu", "cuda:0", or a dict
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    prompt_format: PromptFormat = MISSING  # the checkpoint's chat template: every model YAML names it
    random_init: bool = False  # build hub_id's architecture (models/configs/) with random weights, no checkpoint
    text_layers: Optional[int] = None  # random_init only: build this many decoder layers (None: all)
    seed: int = 0  # random_init only: the weights' seed
    image_size: Optional[int] = None  # resize every image to this square first (672: the papers' 2x2 grid)


@dataclass
class EvalConfig:
    """Extra per-sample measurements; none changes an answer, so none is part of the run identity."""

    fidelity: bool = False  # compare every sample with the uncompressed model (runners.fidelity)
    fidelity_cache: str = "${paths.output_dir}/cache/fidelity"  # uncompressed references, one file per sample


@dataclass
class EvaluateConfig:
    """``runners.evaluate``: model x compressor x benchmark, one run directory per combination."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: Any = MISSING
    compressor: Any = MISSING
    benchmark: Any = MISSING
    cost: Any = MISSING  # conventions of the per-sample cost figures (conf/cost/, models.cost.CostConvention)
    resume: bool = True  # skip samples already in samples.jsonl (the config must match)
    progress: bool = True  # rich progress bar
    save_provenance: bool = False  # store which source tokens each kept token came from
    num_threads: Optional[int] = None  # torch CPU threads; None = torch's default
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: Optional[str] = None  # None: outputs/runs/<model>/<benchmark>/<settings> (runners.identity)


# The schema each model loader's settings follow (run directory names list what differs from it).
MODEL_SCHEMAS = {"tiny": TinyModelConfig, "local": LocalModelConfig}


@dataclass
class EfficiencyConfig:
    """``runners.efficiency``: measured prefill, decode, memory and compressor overhead beside theory."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: Any = MISSING
    compressor: Any = MISSING
    cost: Any = MISSING  # convention of the theoretical figures beside the measured ones
    device_preset: str = "auto"  # peak TFLOP/s for the fraction of peak: auto | none | a100 | h100 | h100_pcie | h200
    image_hw: List[int] = field(default_factory=lambda: [672, 672])  # (height, width): 2x2 grid, 2,928 tokens
    question: str = "What is written in the image?\nAnswer the question using a single word or phrase."
    warmup: int = 1  # untimed runs of every measured part first
    repeats: int = 5  # timed runs; the median is reported
    decode_tokens: int = 16  # tokens generated per decode measurement (EOS suppressed)
    flop_check: bool = False  # count one prefill with torch's FlopCounterMode beside the analytic figure
    resume: bool = True  # reuse efficiency.json of an identical earlier job
    progress: bool = True
    num_threads: Optional[int] = None


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="efficiency_schema", node=EfficiencyConfig)
    store.store(name="tiny_model_schema", node=TinyModelConfig)
    store.store(name="local_model_schema", node=LocalModelConfig)
    store.store(name="cost_schema", node=CostConvention)


register_schemas()

# conf/hydra/launcher/{submitit_slurm,submitit_local,joblib}.yaml give the launcher plugins' configs of
# the same name vtclab's values; Hydra 1.3 checks them against the plugin's dataclass (its automatic
# schema matching: a typo or a wrong type still fails at compose) and warns that the matching is deprecated.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/(submitit_slurm|submitit_local|joblib)' is validated "
                        "against ConfigStore schema with the same name", category=UserWarning)
