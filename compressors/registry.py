"""Compressor registry: ``@register_compressor("name")`` on a class, lookup with a helpful error.

A compressor is one module in ``compressors/`` (imported automatically by the package) plus one
config ``conf/compressor/<name>.yaml`` whose keys are the class's ``__init__`` arguments.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

from compressors.base import Compressor

_REGISTRY: dict[str, type[Compressor]] = {}
C = TypeVar("C", bound=type[Compressor])


def register_compressor(name: str) -> Callable[[C], C]:
    """Class decorator: register a ``Compressor`` subclass under ``name`` (names are unique)."""

    def decorator(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise TypeError(f"@register_compressor({name!r}) must decorate a Compressor subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"compressor name {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_compressors(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _unknown(kind: str, value: str, allowed: list[str]) -> ValueError:
    hint = difflib.get_close_matches(value, allowed, n=1)
    suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
    return ValueError(f"unknown {kind} {value!r}.{suggestion} Allowed: {', '.join(allowed)}")


def get_compressor_class(name: str) -> type[Compressor]:
    """The class registered as ``name``; an unknown name raises, listing the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown("compressor", name, list_compressors()) from None


def compressor_parameters(cls: type[Compressor]) -> dict[str, inspect.Parameter]:
    """The keyword arguments a compressor class accepts (its config keys besides ``name``)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def build_compressor(cfg: Mapping[str, Any]) -> Compressor:
    """Build a compressor from a config mapping ``{"name": ..., **init_kwargs}``.

    Unknown keys fail here, before any model is loaded, naming the keys the class accepts.
    """
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ValueError(f"compressor config needs a 'name'; allowed: {', '.join(list_compressors())}")
    cls = get_compressor_class(str(cfg.pop("name")))
    params = compressor_parameters(cls)
    for key in cfg:
        if key not in params:
            raise _unknown(f"key for compressor {cls.name!r}:", key, sorted(params))
    return cls(**cfg)
