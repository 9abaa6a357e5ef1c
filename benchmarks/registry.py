"""Benchmark registry: ``@register_benchmark("name")`` on a class, lookup with a helpful error.

A benchmark is one module in ``benchmarks/`` (imported automatically by the package) plus one
config ``conf/benchmark/<name>.yaml`` whose keys are the class's ``__init__`` arguments, so a bad
key or value fails in ``build_benchmark``, before any model is loaded. The mechanics are the
shared ``vtclab.registry.Registry``.
"""

from __future__ import annotations

from benchmarks.base import Benchmark
from vtclab.registry import Registry

BENCHMARKS: Registry[Benchmark] = Registry("benchmark", Benchmark)
register_benchmark = BENCHMARKS.register
list_benchmarks = BENCHMARKS.names
get_benchmark_class = BENCHMARKS.get
benchmark_parameters = Registry.parameters
build_benchmark = BENCHMARKS.build
