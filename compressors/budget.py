"""What a method's ``ratio`` means: a validated ``budget`` config node (peer_methods.md §8).

The peers count their budgets differently (per view or over the whole image, newlines or not), so
"r = 0.25" is only comparable across methods once each says which convention it uses. A method
declares the conventions it implements (its authors'); a config asking for another one is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from compressors.base import check_choice

BUDGET_SCOPES = ("per_view", "global")


@dataclass(frozen=True)
class Budget:
    """What a method's ``ratio`` is a fraction of, so results tables can say it (peer_methods.md §8).

    Attributes:
        scope: ``"per_view"``: every view (thumbnail, each crop) keeps about ``ratio`` of its own
            ``side**2`` tokens; ``"global"``: one budget for all of the image's views, which the
            method splits among them.
        count_newlines: whether the ``image_newline`` tokens the method emits count toward the
            budget (False also for methods that emit none).
    """

    scope: str
    count_newlines: bool

    def as_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "count_newlines": self.count_newlines}

    def as_default(self) -> Mapping[str, Any]:
        """The config node as a read-only mapping: a constructor default that equals its YAML value
        (so results tables do not list it as a changed option)."""
        return MappingProxyType(self.as_dict())

    @staticmethod
    def parse(value: Mapping[str, Any] | None, supported: tuple["Budget", ...]) -> "Budget":
        """The ``budget`` config node of a method that supports ``supported`` (the first is its default).

        A method states the convention its authors use; a node asking for another one is refused
        with the supported values, rather than silently meaning something else.
        """
        if value is None:
            return supported[0]
        if not isinstance(value, Mapping) or set(value) != {"scope", "count_newlines"}:
            raise ValueError(f"compressor.budget must be a mapping with keys scope, count_newlines; got {value!r}")
        scope, newlines = value["scope"], value["count_newlines"]
        check_choice("budget.scope", scope, BUDGET_SCOPES)
        if not isinstance(newlines, bool):
            raise ValueError(f"compressor.budget.count_newlines must be true or false; got {newlines!r}")
        budget = Budget(scope, newlines)
        if budget not in supported:
            allowed = "; ".join(str(b.as_dict()) for b in supported)
            raise ValueError(f"compressor.budget {budget.as_dict()} is not supported by this method; allowed: {allowed}")
        return budget
