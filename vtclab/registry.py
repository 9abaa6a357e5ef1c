"""A generic registry: ``@registry.register("name")`` on a class, lookup and building with helpful errors.

timm-style: an entry is one module that decorates its class; a config mapping ``{"name": ..., **kwargs}``
builds it, and an unknown name or key fails with the allowed values (and a close match). Compressors
and benchmarks each own one ``Registry`` instance; this module depends on neither.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


def unknown_value_error(kind: str, value: str, allowed: list[str]) -> ValueError:
    """``unknown <kind> 'x'. Did you mean 'y'? Allowed: a, b, c``."""
    hint = difflib.get_close_matches(value, allowed, n=1)
    suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
    return ValueError(f"unknown {kind} {value!r}.{suggestion} Allowed: {', '.join(allowed)}")


def import_submodules(package: str, path: Iterable[str], skip: set[str]) -> None:
    """Import every module of a package except ``skip`` and private ones (so they can register)."""
    for module in pkgutil.iter_modules(path):
        if module.name not in skip and not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


class Registry(Generic[T]):
    """Named subclasses of ``base``, built from config mappings ``{"name": ..., **init_kwargs}``.

    Args:
        kind: what is registered, for messages ("compressor", "benchmark").
        base: the class every entry must subclass; entries get their name as ``cls.name``.
    """

    def __init__(self, kind: str, base: type[T]) -> None:
        self.kind = kind
        self.base = base
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register a subclass of ``base`` under ``name`` (names are unique)."""

        def decorator(cls: type[T]) -> type[T]:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"@register_{self.kind}({name!r}) must decorate a {self.base.__name__} "
                                f"subclass, got {cls!r}")
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered by "
                                 f"{self._classes[name].__module__}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorator

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._classes if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; an unknown name raises, listing the registered ones."""
        try:
            return self._classes[name]
        except KeyError:
            raise unknown_value_error(self.kind, name, self.names()) from None

    @staticmethod
    def parameters(cls: type) -> dict[str, inspect.Parameter]:
        """The keyword arguments a class accepts (its config keys besides ``name``)."""
        params = inspect.signature(cls.__init__).parameters
        return {k: p for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}

    def build(self, cfg: Mapping[str, Any]) -> T:
        """Build from a config mapping; unknown names and keys fail here, before any model loads."""
        cfg = dict(cfg)
        if "name" not in cfg:
            raise ValueError(f"{self.kind} config needs a 'name'; allowed: {', '.join(self.names())}")
        cls = self.get(str(cfg.pop("name")))
        params = self.parameters(cls)
        for key in cfg:
            if key not in params:
                raise unknown_value_error(f"key for {self.kind} {cls.name!r}:", str(key), sorted(params))
        return cls(**cfg)
