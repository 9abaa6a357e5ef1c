"""Visual-token compressors behind one interface (see ``compressors.base``).

Every module in this package is imported here, so a new compressor is one file that uses
``@register_compressor`` plus one ``conf/compressor/<name>.yaml``.
"""

from compressors.base import (
    AttentionRows,
    ClsAttention,
    Compressor,
    DecoderKeys,
    DecoderOutput,
    LLMDecision,
    LLMInput,
    LLMSignal,
    LayerKeys,
    PromptEmbeddings,
    Provenance,
    VisionInput,
    VisionOutput,
    VisionSignal,
)
from compressors.budget import Budget
from compressors.geometry import AnyResLayout, layout_for_image
from compressors.registry import build_compressor, get_compressor_class, list_compressors, register_compressor
from vtclab.registry import import_submodules

import_submodules(__name__, __path__, skip={"base", "budget", "geometry", "packing", "registry"})

__all__ = [
    "AnyResLayout",
    "AttentionRows",
    "Budget",
    "ClsAttention",
    "Compressor",
    "DecoderKeys",
    "DecoderOutput",
    "LLMDecision",
    "LLMInput",
    "LLMSignal",
    "LayerKeys",
    "PromptEmbeddings",
    "Provenance",
    "VisionInput",
    "VisionOutput",
    "VisionSignal",
    "build_compressor",
    "get_compressor_class",
    "layout_for_image",
    "list_compressors",
    "register_compressor",
]
