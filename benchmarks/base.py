"""The benchmark interface: a lazy, indexable list of samples plus its own scoring rule.

The runner only needs ids (to resume), one sample at a time (to generate) and the scoring rule,
so a benchmark never has to hold its images in memory, and listing ids never decodes or draws
an image. Subclasses implement three small hooks (``_num_available``, ``_sample_id``,
``_load``) and ``build_scorer``; ``limit`` handling and bounds checks live here so every
benchmark treats ``benchmark.limit=N`` the same way (the first N samples).

Scoring is a separate, pure object (``Scorer``): per-sample fields from the stored prediction,
references and meta, and metrics from the stored records. A finished run can therefore be
rescored from its ``samples.jsonl`` alone (``runners.rescore``), without the model or the data.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from vtclab.errors import UsageError

SCORER_VARIANTS: tuple[str, ...] = ("llava", "lmms_eval")


class SampleError(Exception):
    """A sample that cannot be built: malformed record, unreadable image, path outside the data root.

    The runner records it as a failed sample with this message and goes on.
    """


class DataRootError(UsageError, FileNotFoundError):
    """A missing or incomplete data root; the message names the files expected and their source (a usage
    error: the runner prints it alone, before anything is written)."""


@dataclass(frozen=True)
class Sample:
    """One question about one image.

    Attributes:
        id: stable and unique within the benchmark; the resume key in ``samples.jsonl``.
        image: RGB image.
        question: the user text that follows ``<image>\\n`` (answer-format suffix included).
        answers: reference answer(s); empty when the data holds none (a test split scored only by
            the official server).
        meta: JSON-serialisable extras (category, image size, expected grid, ...), copied into
            result records.
    """

    id: str
    image: Image.Image
    question: str
    answers: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.answers, tuple) or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"Sample {self.id!r}: answers must be a tuple of strings, got {self.answers!r}")
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


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Validate a config string that must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"benchmark.{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


class Scorer(ABC):
    """A benchmark's scoring rule, a pure function of stored predictions and references.

    ``score`` gives the per-sample fields written to ``samples.jsonl`` (at least ``score``: a float
    in [0, 1], or None when the data holds no answer); ``aggregate`` gives the summary metrics from
    the records; ``headline`` picks the number the papers print.

    Attributes:
        variant: which official tool's rules (``llava`` or ``lmms_eval``).
    """

    def __init__(self, variant: str = "llava") -> None:
        self.variant = check_choice("scorer_variant", variant, SCORER_VARIANTS)

    @abstractmethod
    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Per-sample fields for one prediction."""

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """``accuracy`` (percent mean score) and ``accuracy/<category>`` for each ``meta["category"]``."""
        return mean_accuracy(records)

    def headline(self, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        """``{"metric", "label", "value", "unit"}``: the number the papers print (None: no local score)."""
        return None


def mean_accuracy(records: Sequence[Mapping[str, Any]], key: str = "category") -> dict[str, float]:
    """Percent mean of the records' scores, overall and per ``meta[key]`` (records scored None skipped)."""
    by_group: dict[str, list[float]] = {}
    scores = []
    for record in records:
        if record.get("score") is None:
            continue
        score = float(record["score"])
        scores.append(score)
        group = (record.get("meta") or {}).get(key)
        if group is not None:
            by_group.setdefault(str(group), []).append(score)
    if not scores:
        return {}
    metrics = {"accuracy": 100.0 * sum(scores) / len(scores)}
    for group in sorted(by_group):
        values = by_group[group]
        metrics[f"accuracy/{group}"] = 100.0 * sum(values) / len(values)
    return metrics


class Benchmark(ABC):
    """Base class: limit-aware indexing over lazily built samples, scored by the class's ``Scorer``.

    Class attributes:
        name: registry name (set by ``@register_benchmark``).
    Attributes:
        limit: keep only the first ``limit`` samples (None = all).
        max_new_tokens: generation budget per sample.
        scorer: the scoring rule (``build_scorer(scorer_variant)``).
    """

    name: ClassVar[str] = ""

    def __init__(self, *, limit: int | None = None, max_new_tokens: int = 16, scorer_variant: str = "llava") -> None:
        self.limit = check_limit(limit)
        self.max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        self.scorer: Scorer = self.build_scorer(check_choice("scorer_variant", scorer_variant, SCORER_VARIANTS))

    @classmethod
    @abstractmethod
    def build_scorer(cls, variant: str = "llava") -> Scorer:
        """The scoring rule for ``variant``; needs no data, so a stored run can be rescored."""

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
    def score(self, prediction: str, sample: Sample) -> dict[str, Any]:
        """Per-sample score fields (``score`` at least), from the scorer."""
        return self.scorer.score(prediction, sample.answers, sample.meta)

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Summary metrics of finished records, from the scorer."""
        if not records:
            raise ValueError(f"{self.name}: no records to aggregate")
        return self.scorer.aggregate(records)

    def write_submission(self, records: Sequence[Mapping[str, Any]], directory: Path) -> list[Path]:
        """Write the files an official evaluation server takes (none by default); returns their paths."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, len={len(self)}, limit={self.limit})"
