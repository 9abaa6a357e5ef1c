"""Benchmark registry: ``@register_benchmark("name")`` on a class, lookup with a helpful error.

A benchmark is one module in ``benchmarks/`` (imported automatically by the package) plus one
config ``conf/benchmark/<name>.yaml`` whose keys are the class's ``__init__`` arguments, so a bad
key or value fails in ``build_benchmark``, before any model is loaded.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

from benchmarks.base import Benchmark

_REGISTRY: dict[str, type[Benchmark]] = {}
B = TypeVar("B", bound=type[Benchmark])


def register_benchmark(name: str) -> Callable[[B], B]:
    """Class decorator: register a ``Benchmark`` subclass under ``name`` (names are unique)."""

    def decorator(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
            raise TypeError(f"@register_benchmark({name!r}) must decorate a Benchmark subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"benchmark name {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_benchmarks(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _unknown(kind: str, value: str, allowed: list[str]) -> ValueError:
    hint = difflib.get_close_matches(value, allowed, n=1)
    suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
    return ValueError(f"unknown {kind} {value!r}.{suggestion} Allowed: {', '.join(allowed)}")


def get_benchmark_class(name: str) -> type[Benchmark]:
    """The class registered as ``name``; an unknown name raises, listing the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown("benchmark", name, list_benchmarks()) from None


def benchmark_parameters(cls: type[Benchmark]) -> dict[str, inspect.Parameter]:
    """The keyword arguments a benchmark class accepts (its config keys besides ``name``)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def build_benchmark(cfg: Mapping[str, Any]) -> Benchmark:
    """Build a benchmark from a config mapping ``{"name": ..., **init_kwargs}``.

    Unknown keys and bad values (e.g. ``limit=0``) fail here, naming what is allowed.
    """
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ValueError(f"benchmark config needs a 'name'; allowed: {', '.join(list_benchmarks())}")
    cls = get_benchmark_class(str(cfg.pop("name")))
    params = benchmark_parameters(cls)
    for key in cfg:
        if key not in params:
            raise _unknown(f"key for benchmark {cls.name!r}:", str(key), sorted(params))
    return cls(**cfg)
