"""vtclab's core: what ``compressors/``, ``benchmarks/``, ``models/`` and ``runners/`` all share.

Kept free of torch and transformers so importing it is instant (config validation, listings).
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("vtclab")
except metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
