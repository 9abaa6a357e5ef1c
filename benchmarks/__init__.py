"""Benchmarks behind one interface (see ``benchmarks.base``): lazy samples plus their scoring rule.

Every module in this package is imported here, so a new benchmark is one file that uses
``@register_benchmark`` plus one ``conf/benchmark/<name>.yaml``.
"""

import importlib
import pkgutil

from benchmarks.base import Benchmark, Sample
from benchmarks.registry import build_benchmark, get_benchmark_class, list_benchmarks, register_benchmark
from benchmarks.scoring import exact_match, normalize_answer

_INFRASTRUCTURE = {"base", "registry", "scoring"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Benchmark",
    "Sample",
    "build_benchmark",
    "exact_match",
    "get_benchmark_class",
    "list_benchmarks",
    "normalize_answer",
    "register_benchmark",
]
