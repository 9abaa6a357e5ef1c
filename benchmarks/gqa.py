"""``gqa``: GQA testdev-balanced (12,578 questions), scored as the official GQA ``eval.py``.

Layouts (``benchmark.root``):

* ``llava``: ``llava_gqa_testdev_balanced.jsonl`` (LLaVA's question file), ``data/images/``,
  ``data/testdev_balanced_questions.json`` (official GQA questions, the gold answers).
* ``lmms_lab``: ``testdev_balanced_instructions/testdev-*.parquet`` and
  ``testdev_balanced_images/testdev-*.parquet`` (lmms-lab/GQA), joined on ``imageId``.

Scoring (``scorer_variant``):

* ``llava``: LLaVA's ``convert_gqa_for_eval.py`` (``text.rstrip('.').lower()``) then the official
  ``eval.py``: exact string match, averaged over balanced questions; Binary and Open split by the
  question's structural type (``query`` is open).
* ``lmms_eval``: ``exact_match`` with ``ignore_case`` and ``ignore_punctuation`` (lower-case, every
  ``string.punctuation`` character removed from both sides).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.base import Scorer
from benchmarks.data import Entry, Expected, FileImage, ParquetImage, ParquetTable, read_jsonl
from benchmarks.local import LLAVA_EVAL_DOCS, SHORT_ANSWER, LocalBenchmark, write_json
from benchmarks.registry import register_benchmark

LLAVA_QUESTIONS = "llava_gqa_testdev_balanced.jsonl"
GOLD = "data/testdev_balanced_questions.json"
IMAGES = "data/images"
LMMS_QUESTIONS = "testdev_balanced_instructions/testdev-*.parquet"
LMMS_IMAGES = "testdev_balanced_images/testdev-*.parquet"
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _mean_percent(scores: Sequence[float]) -> float:
    """The official ``avg(l) * 100``: ``float(sum(l)) / len(l) * 100``."""
    return float(sum(scores)) / len(scores) * 100


class GQAScorer(Scorer):
    """Exact match against GQA's single gold answer (see the module doc for the two variants)."""

    def parse(self, prediction: str) -> str:
        if self.variant == "llava":
            return prediction.rstrip(".").lower()
        return prediction.lower().translate(_NO_PUNCTUATION)

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        parsed = self.parse(prediction)
        gold = reference[0] if self.variant == "llava" else reference[0].lower().translate(_NO_PUNCTUATION)
        return {"score": float(parsed == gold), "parsed_prediction": parsed}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        scored = [r for r in records if r["meta"].get("is_balanced", True)]
        if not scored:
            return {}
        if self.variant == "lmms_eval":  # mean over every question, as lmms-eval's aggregation
            return {"accuracy": sum(float(r["score"]) for r in records) / len(records) * 100}
        metrics = {"accuracy": _mean_percent([r["score"] for r in scored])}
        for kind in ("binary", "open"):
            scores = [r["score"] for r in scored if r["meta"].get("answer_type") == kind]
            if scores:
                metrics[kind] = _mean_percent(scores)
        return metrics

    def headline(self, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        if "accuracy" not in metrics:
            return None
        return {"metric": "accuracy", "label": "GQA", "value": metrics["accuracy"], "unit": "%"}


def _answer_type(types: Any) -> str | None:
    structural = types.get("structural") if isinstance(types, Mapping) else None
    return None if structural is None else ("open" if structural == "query" else "binary")


@register_benchmark("gqa")
class GQA(LocalBenchmark):
    """GQA testdev-balanced; see the module doc for files and scoring."""

    sources = {
        "llava": f"{LLAVA_EVAL_DOCS} (question file), and https://cs.stanford.edu/people/dorarad/gqa/download.html "
                 "(images.zip -> data/images, questions1.2.zip -> data/testdev_balanced_questions.json)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/GQA (folders testdev_balanced_instructions, "
                    "testdev_balanced_images)",
    }

    def __init__(self, root: str, layout: str = "llava", scorer_variant: str = "llava", limit: int | None = None,
                 max_new_tokens: int = 128) -> None:
        super().__init__(root=root, layout=layout, scorer_variant=scorer_variant, limit=limit,
                         max_new_tokens=max_new_tokens)

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> GQAScorer:
        return GQAScorer(variant)

    def _read_llava(self) -> list[Entry]:
        self.root.require([Expected(LLAVA_QUESTIONS, "LLaVA's question file"),
                           Expected(GOLD, "official GQA testdev-balanced questions with answers"),
                           Expected(IMAGES, "GQA images")])
        gold = self.root.load_json(GOLD)
        entries = []
        for position, line in enumerate(read_jsonl(self.root.file(LLAVA_QUESTIONS))):
            if isinstance(line, str):
                entries.append(Entry(id=f"line-{position}", error=line))
                continue
            qid = str(line.get("question_id", f"line-{position}"))
            question = gold.get(qid) if isinstance(gold, dict) else None
            if "text" not in line or "image" not in line:
                entries.append(Entry(id=qid, error=f"question {qid} lacks 'text' or 'image' in {LLAVA_QUESTIONS}"))
            elif question is None or "answer" not in question:
                entries.append(Entry(id=qid, error=f"question {qid} has no gold answer in {GOLD}"))
            else:
                entries.append(Entry(
                    id=qid, question=line["text"], answers=(str(question["answer"]),),
                    meta={"is_balanced": bool(question.get("isBalanced", True)),
                          "answer_type": _answer_type(question.get("types"))},
                    image=FileImage(self.root, line["image"], IMAGES)))
        return entries

    def _read_lmms_lab(self) -> list[Entry]:
        self.root.require([Expected(LMMS_QUESTIONS, "lmms-lab/GQA questions (testdev_balanced_instructions)"),
                           Expected(LMMS_IMAGES, "lmms-lab/GQA images (testdev_balanced_images)")])
        questions = ParquetTable(self.root.glob(LMMS_QUESTIONS), ["id", "imageId", "question", "answer",
                                                                    "isBalanced", "types"])
        images = ParquetTable(self.root.glob(LMMS_IMAGES), ["id"])
        image_row = {str(image_id): row for row, image_id in enumerate(images.columns["id"])}
        columns = questions.columns
        entries = []
        for row in range(len(questions)):
            qid = str(columns["id"][row])
            image = image_row.get(str(columns["imageId"][row]))
            if columns["question"][row] is None or columns["answer"][row] is None:
                entries.append(Entry(id=qid, error=f"question {qid} lacks 'question' or 'answer'"))
            elif image is None:
                entries.append(Entry(id=qid, error=f"image {columns['imageId'][row]!r} of question {qid} is not in "
                                                   "testdev_balanced_images"))
            else:
                balanced = columns["isBalanced"][row]
                entries.append(Entry(
                    id=qid, question=columns["question"][row] + SHORT_ANSWER, answers=(str(columns["answer"][row]),),
                    meta={"is_balanced": True if balanced is None else bool(balanced),
                          "answer_type": _answer_type(columns["types"][row])},
                    image=ParquetImage(images, image)))
        return entries

    def write_submission(self, records: Sequence[Mapping[str, Any]], directory: Path) -> list[Path]:
        """``testdev_balanced_predictions.json`` for the official ``eval.py`` (LLaVA's conversion)."""
        rows = [{"questionId": r["id"], "prediction": r["prediction"].rstrip(".").lower()}
                for r in records if "prediction" in r]
        return [write_json(directory / "testdev_balanced_predictions.json", rows)]
