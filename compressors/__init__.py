"""Visual-token compressors behind one interface (see ``compressors.base``).

Every module in this package is imported here, so a new compressor is one file that uses
``@register_compressor`` plus one ``conf/compressor/<name>.yaml``.
"""

import importlib
import pkgutil

from compressors.base import (
    ClsAttention,
    Compressor,
    LastTokenAttention,
    LLMInput,
    Provenance,
    VisionInput,
    VisionOutput,
)
from compressors.geometry import AnyResLayout, layout_for_image
from compressors.registry import build_compressor, get_compressor_class, list_compressors, register_compressor

_INFRASTRUCTURE = {"base", "geometry", "packing", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AnyResLayout",
    "ClsAttention",
    "Compressor",
    "LLMInput",
    "LastTokenAttention",
    "Provenance",
    "VisionInput",
    "VisionOutput",
    "build_compressor",
    "get_compressor_class",
    "layout_for_image",
    "list_compressors",
    "register_compressor",
]
