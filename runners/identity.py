"""What a run is: the settings and code that define its results, and the directory named after them.

* The **identity** (kept in ``run.json``) is every resolved setting except those that only say
  where or how the run executes (``EXECUTION_KEYS``, ``model.path``, ``model.device_map``,
  ``benchmark.root``) and ``benchmark.limit`` (a larger limit extends the same run); plus the
  checkpoint's fingerprint (``models.loading.checkpoint_fingerprint``: a moved copy of a checkpoint
  is the same run, another checkpoint is not); plus the code: vtclab version, git commit and dirty
  flag, torch and transformers versions. Resuming under another identity is refused, naming the keys.
* The **directory** is ``<output_dir>/runs/<model>/<benchmark>/<compressor>,ratio=<r>[,k=v...]``,
  where ``k=v`` lists, in canonical form, every identity setting that differs from its default
  (a compressor's or benchmark's constructor default, the model or cost schema's default, the
  runner schema's default). So ``0.5``, ``0.50`` and ``.5`` are one directory, a value equal to the
  default names no directory of its own, and an experiment preset lands where the same settings
  given by hand land. Settings whose schema default is ``???`` (a model's name, hub id, prompt
  format) come with the model and are not repeated in the name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
from collections.abc import Mapping
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import MISSING

import vtclab
from benchmarks.registry import get_benchmark_class
from compressors.registry import get_compressor_class
from models.cost import CostConvention
from runners.schema import MODEL_SCHEMAS, EvaluateConfig
from runners.store import flatten
from vtclab.registry import Registry

# Where and how a run executes; never part of what it is.
EXECUTION_KEYS = ("paths", "resume", "progress", "num_threads", "run_dir",
                  "eval")  # eval: extra per-sample measurements (fidelity), which change no answer
MODEL_EXECUTION_KEYS = ("path", "device_map", "rebuild")  # the fingerprint stands for the path; rebuild: a hint
BENCHMARK_EXECUTION_KEYS = ("limit", "root")  # a larger limit extends the run; root: where the data lives
GROUPS = ("model", "compressor", "benchmark")
SETTING_SCHEMAS = {"cost": CostConvention}  # other groups whose schema gives their defaults
MAX_NAME = 200  # characters; file systems allow 255 bytes per path component

REPO_ROOT = Path(__file__).resolve().parents[1]


def canonical(value: Any) -> str:
    """One spelling per value: ``0.5``/``0.50``/``.5`` -> ``0.5``, ``1``/``1.0`` -> ``1``, ``True`` -> ``true``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        number = float(value)
        return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def run_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved settings that define a run's results (execution keys and the limit left out)."""
    settings = {k: v for k, v in cfg.items() if k not in EXECUTION_KEYS and k != "hydra"}
    settings["model"] = {k: v for k, v in cfg["model"].items() if k not in MODEL_EXECUTION_KEYS}
    settings["benchmark"] = {k: v for k, v in cfg["benchmark"].items() if k not in BENCHMARK_EXECUTION_KEYS}
    return settings


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_versions() -> dict[str, Any]:
    """The code a run's results depend on besides its settings (once per process)."""
    in_git = _git("rev-parse", "--show-toplevel") == str(REPO_ROOT)
    status = _git("status", "--porcelain", "--untracked-files=no") if in_git else None
    return {
        "vtclab": vtclab.__version__,
        "git_commit": _git("rev-parse", "HEAD") if in_git else None,
        "git_dirty": bool(status) if status is not None else None,
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
    }


def run_identity(cfg: Mapping[str, Any], checkpoint: str | None = None) -> dict[str, Any]:
    """``run_settings`` plus the checkpoint fingerprint (local models) and ``code_versions``."""
    identity = run_settings(cfg)
    if checkpoint is not None:
        identity["model"]["checkpoint"] = checkpoint
    identity["code"] = code_versions()
    return identity


# -- directory names -------------------------------------------------------------------------------


def _class_defaults(cls: type) -> dict[str, Any]:
    return {k: p.default for k, p in Registry.parameters(cls).items() if p.default is not p.empty}


def _schema_defaults(schema: type) -> dict[str, Any]:
    """A structured-config dataclass's defaults (``MISSING`` for required keys), enums as their values."""
    defaults = {}
    for item in dataclasses.fields(schema):
        if item.default is not dataclasses.MISSING:
            value = item.default
        elif item.default_factory is not dataclasses.MISSING:
            value = item.default_factory()
        else:
            value = MISSING
        defaults[item.name] = value.value if isinstance(value, Enum) else value
    return defaults


def _differing(values: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``k=v`` for each value that differs from its default (keys with a ``???`` default are skipped)."""
    flat_values, flat_defaults = flatten(values), flatten(defaults)
    parts = []
    for key in sorted(flat_values):
        if key in flat_defaults:
            default = flat_defaults[key]
            if default == MISSING or canonical(flat_values[key]) == canonical(default):
                continue
        parts.append(f"{prefix}{key}={canonical(flat_values[key])}")
    return parts


def _path_component(text: str) -> str:
    text = text.replace("/", "_").replace("\\", "_")
    return f"_{text}" if text in ("", ".", "..") else text


def run_name(settings: Mapping[str, Any]) -> str:
    """``<compressor>,ratio=<r>`` then every other setting that differs from its default, canonical."""
    compressor = dict(settings["compressor"])
    name = str(compressor.pop("name"))
    parts = [name, f"ratio={canonical(compressor.pop('ratio', None))}"]
    parts += _differing(compressor, _class_defaults(get_compressor_class(name)))
    benchmark = dict(settings["benchmark"])
    benchmark_class = get_benchmark_class(str(benchmark.pop("name")))
    parts += _differing(benchmark, _class_defaults(benchmark_class), prefix="benchmark.")
    model = dict(settings["model"])
    schema = MODEL_SCHEMAS.get(str(model.get("loader")))
    parts += _differing({k: v for k, v in model.items() if k != "name"},
                        _schema_defaults(schema) if schema else {}, prefix="model.")
    top = {k: v for k, v in settings.items() if k not in GROUPS and k != "code"}
    for key, schema in SETTING_SCHEMAS.items():  # other config groups with a schema: cost
        if key in top:
            parts += _differing(top.pop(key), _schema_defaults(schema), prefix=f"{key}.")
    parts += _differing(top, _schema_defaults(EvaluateConfig))
    text = _path_component(",".join(parts))
    if len(text) > MAX_NAME:  # keep it readable and unique
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        text = f"{text[:MAX_NAME - 13]}~{digest}"
    return text


def run_directory(cfg: Mapping[str, Any]) -> Path:
    """``run_dir`` when set, else ``<paths.output_dir>/runs/<model>/<benchmark>/<run_name>``."""
    if cfg.get("run_dir"):
        return Path(cfg["run_dir"])
    settings = run_settings(cfg)
    return (Path(cfg["paths"]["output_dir"]) / "runs" / _path_component(str(cfg["model"]["name"]))
            / _path_component(str(cfg["benchmark"]["name"])) / run_name(settings))
