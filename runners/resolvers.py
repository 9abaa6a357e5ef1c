"""OmegaConf resolvers used by the Hydra configs (registered on import)."""

from __future__ import annotations

from omegaconf import OmegaConf


def run_name(override_dirname: str) -> str:
    """Directory name for a run: its overrides (``compressor=random,compressor.ratio=0.5``), or
    ``default`` when there are none. Path separators in values are replaced by ``_``."""
    return override_dirname.replace("/", "_") if override_dirname else "default"


if not OmegaConf.has_resolver("vtclab_run_name"):
    OmegaConf.register_new_resolver("vtclab_run_name", run_name)
