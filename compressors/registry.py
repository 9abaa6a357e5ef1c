"""The compressor registry: ``@register_compressor("name")`` on a class, lookup and building.

A compressor is one module in ``compressors/`` (imported automatically by the package) plus one
config ``conf/compressor/<name>.yaml`` whose keys are the class's ``__init__`` arguments. The
mechanics are the shared ``vtclab.registry.Registry``.
"""

from __future__ import annotations

from compressors.base import Compressor
from vtclab.registry import Registry

COMPRESSORS: Registry[Compressor] = Registry("compressor", Compressor)
register_compressor = COMPRESSORS.register
list_compressors = COMPRESSORS.names
get_compressor_class = COMPRESSORS.get
compressor_parameters = Registry.parameters
build_compressor = COMPRESSORS.build
