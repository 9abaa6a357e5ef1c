"""The benchmark interface: a lazy, indexable list of samples plus its own scoring rule.

The runner only needs ids (to resume), one sample at a time (to generate) and the scoring rule,
so a benchmark never has to hold its images in memory, and listing ids never decodes or draws
an image. Subclasses implement three small hooks (``_num_available``, ``_sample_id``,
``_load``) and ``score``; ``limit`` handling, bounds checks and the default aggregate live here
so every benchmark treats ``benchmark.limit=N`` the same way (the first N samples).
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image


@dataclass(frozen=True)
class Sample:
    """One question about one image.

    Attributes:
        id: stable and unique within the benchmark; the resume key in ``samples.jsonl``.
        image: RGB image.
        question: the user text that follows ``<image>\\n`` (answer-format suffix included).
        answers: reference answer(s); a prediction matching any of them is correct.
        meta: JSON-serialisable extras (category, image size, expected grid, ...), copied into
            result records.
    """

    id: str
    image: Image.Image
    question: str
    answers: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.answers, tuple) or not self.answers:
            raise ValueError(f"Sample {self.id!r}: answers must be a non-empty tuple, got {self.answers!r}")
        if self.image.mode != "RGB":
            raise ValueError(f"Sample {self.id!r}: image must be RGB, got mode {self.image.mode!r}")


def check_positive_int(key: str, value: Any) -> int:
    """Validate a config integer that must be >= 1 (bools and strings rejected: no silent casts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"benchmark.{key} must be a positive integer, got {value!r} ({type(value).__name__})")
    return value


def check_limit(limit: Any) -> int | None:
    """Validate ``benchmark.limit``: None (every sample) or a positive integer."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(
            f"benchmark.limit must be a positive integer or null (all samples), "
            f"got {limit!r} ({type(limit).__name__})"
        )
    return limit


class Benchmark(ABC):
    """Base class: limit-aware indexing over lazily built samples, and a mean-score aggregate.

    Class attributes:
        name: registry name (set by ``@register_benchmark``).
    Attributes:
        limit: keep only the first ``limit`` samples (None = all).
        max_new_tokens: generation budget per sample.
    """

    name: ClassVar[str] = ""

    def __init__(self, *, limit: int | None = None, max_new_tokens: int = 16) -> None:
        self.limit = check_limit(limit)
        self.max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)

    # -- hooks for subclasses ----------------------------------------------------------------------
    @abstractmethod
    def _num_available(self) -> int:
        """How many samples exist before ``limit`` is applied."""

    @abstractmethod
    def _sample_id(self, index: int) -> str:
        """The id of sample ``index`` (0 <= index < len(self)), without building the sample."""

    @abstractmethod
    def _load(self, index: int) -> Sample:
        """Build or load sample ``index`` (0 <= index < len(self))."""

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> dict[str, Any]:
        """Score one prediction: at least ``{"score": float in [0, 1]}``."""

    # -- sequence interface ------------------------------------------------------------------------
    def __len__(self) -> int:
        available = self._num_available()
        return available if self.limit is None else min(available, self.limit)

    def __getitem__(self, index: int) -> Sample:
        size = len(self)
        position = operator.index(index)
        if position < 0:
            position += size
        if not 0 <= position < size:
            raise IndexError(f"{self.name} sample index {index} out of range for {size} samples")
        return self._load(position)

    def __iter__(self) -> Iterator[Sample]:
        return (self._load(i) for i in range(len(self)))

    def sample_ids(self) -> list[str]:
        """The ids of the samples in order; never builds an image (used to skip finished samples)."""
        return [self._sample_id(i) for i in range(len(self))]

    # -- results -----------------------------------------------------------------------------------
    def aggregate(self, records: list[Mapping[str, Any]]) -> dict[str, float]:
        """``accuracy`` (percent mean score) and ``accuracy/<category>`` for each ``meta["category"]``."""
        if not records:
            raise ValueError(f"{self.name}: no records to aggregate")
        by_category: dict[str, list[float]] = {}
        scores = []
        for record in records:
            score = float(record["score"])
            scores.append(score)
            category = (record.get("meta") or {}).get("category")
            if category is not None:
                by_category.setdefault(str(category), []).append(score)
        metrics = {"accuracy": 100.0 * sum(scores) / len(scores)}
        for category in sorted(by_category):
            values = by_category[category]
            metrics[f"accuracy/{category}"] = 100.0 * sum(values) / len(values)
        return metrics

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, len={len(self)}, limit={self.limit})"
