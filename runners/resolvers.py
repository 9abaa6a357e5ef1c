"""OmegaConf resolvers used by the Hydra configs (registered on import)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights"


def run_name(override_dirname: str) -> str:
    """Directory name for a run: its overrides (``compressor=random,compressor.ratio=0.5``), or
    ``default`` when there are none. Path separators in values are replaced by ``_``."""
    return override_dirname.replace("/", "_") if override_dirname else "default"


def shipped_weights(name: str) -> str:
    """Absolute path of a checkpoint shipped in ``models/weights/<name>`` (whatever the working directory)."""
    return str(WEIGHTS_DIR / name)


if not OmegaConf.has_resolver("vtclab_weights"):
    OmegaConf.register_new_resolver("vtclab_weights", shipped_weights)
if not OmegaConf.has_resolver("vtclab_run_name"):
    OmegaConf.register_new_resolver("vtclab_run_name", run_name)
