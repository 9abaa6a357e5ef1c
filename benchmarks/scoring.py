"""Short-answer scoring: one normaliser and exact match, shared by every short-answer benchmark.

Kept free of benchmark state so a score can be recomputed from a stored prediction alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from benchmarks.base import Scorer

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer, so formatting alone never decides a score.

    Steps, in order: lowercase; strip; drop trailing periods ("Red." -> "red"); split on any
    whitespace (collapsing runs, tabs and newlines); drop the articles a/an/the as whole words;
    map the number words zero..ten to digits ("three" -> "3"); join with single spaces.
    Other punctuation is kept on purpose: "3.5" and "e-mail" must survive unchanged.
    """
    text = text.lower().strip()
    while text.endswith("."):
        text = text[:-1].rstrip()
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference answer, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(answer) for answer in answers))


class ExactMatchScorer(Scorer):
    """Exact match after ``normalize_answer`` against any reference (the synthetic benchmark's rule)."""

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        return {"score": exact_match(prediction, reference), "normalized_prediction": normalize_answer(prediction)}
