"""``LocalBenchmark``: a benchmark read from a local folder in one of its published layouts.

A subclass names its layouts' files and turns their records into ``Entry`` objects
(``_read_llava``, ``_read_lmms_lab``); listing, limits, failed records and one-at-a-time image
decoding are handled here. Constructing one only validates the config; the files are read on
first use (``sample_ids``, ``len``, indexing), so configs can be checked without the data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.base import Benchmark, Sample, SampleError, check_choice
from benchmarks.data import DataRoot, Entry, make_ids_unique

LAYOUTS: tuple[str, ...] = ("llava", "lmms_lab")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
LLAVA_EVAL_DOCS = "LLaVA's eval.zip, see https://github.com/haotian-liu/LLaVA/blob/main/docs/Evaluation.md"


class LocalBenchmark(Benchmark):
    """Samples from ``root`` in ``layout``; see each subclass for the files of each layout.

    Class attributes:
        sources: layout -> where the official release publishes the files (shown in errors).
    Args:
        root: the data folder (``benchmark.root``).
        layout: ``llava`` (LLaVA's eval files) or ``lmms_lab`` (the lmms-lab parquet release).
        scorer_variant: ``llava`` (default, GlobalCom2's protocol) or ``lmms_eval``.
    """

    sources: ClassVar[Mapping[str, str]] = {}

    def __init__(self, root: str, layout: str = "llava", scorer_variant: str = "llava", limit: int | None = None,
                 max_new_tokens: int = 128) -> None:
        super().__init__(limit=limit, max_new_tokens=max_new_tokens, scorer_variant=scorer_variant)
        self.layout = check_choice("layout", layout, tuple(self.sources) or LAYOUTS)
        if not isinstance(root, (str, Path)) or not str(root):
            raise ValueError(f"benchmark.root must be a folder path, got {root!r}")
        self.root = DataRoot(root, self.name, self.layout, self.sources[self.layout])
        self._entries: list[Entry] | None = None

    # -- reading -----------------------------------------------------------------------------------
    @property
    def entries(self) -> list[Entry]:
        """Every listed sample (read once, on first use)."""
        if self._entries is None:
            self._entries = make_ids_unique(getattr(self, f"_read_{self.layout}")())
        return self._entries

    def _num_available(self) -> int:
        return len(self.entries)

    def _sample_id(self, index: int) -> str:
        return self.entries[index].id

    def _load(self, index: int) -> Sample:
        entry = self.entries[index]
        if entry.error is not None:
            raise SampleError(entry.error)
        return Sample(id=entry.id, image=entry.image.load(), question=entry.question, answers=entry.answers,
                      meta=dict(entry.meta))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root.path)!r}, layout={self.layout!r}, limit={self.limit})"


def write_json(path: Path, payload: Any) -> Path:
    """A submission file, UTF-8, written in one go."""
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    return path
