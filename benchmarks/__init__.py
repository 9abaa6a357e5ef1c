"""Benchmarks behind one interface (see ``benchmarks.base``): lazy samples plus their scoring rule.

Every module in this package is imported here, so a new benchmark is one file that uses
``@register_benchmark`` plus one ``conf/benchmark/<name>.yaml``.
"""

from benchmarks.base import Benchmark, Sample
from benchmarks.registry import build_benchmark, get_benchmark_class, list_benchmarks, register_benchmark
from benchmarks.scoring import exact_match, normalize_answer
from vtclab.registry import import_submodules

import_submodules(__name__, __path__, skip={"base", "registry", "scoring"})

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
