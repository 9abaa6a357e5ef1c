"""``vqav2`` and ``vizwiz``: the submission files EvalAI takes, and a local VQA accuracy when the
data holds answers (a val split).

``vqav2`` layouts (``benchmark.root``):

* ``llava`` (test-dev): ``llava_vqav2_mscoco_test-dev2015.jsonl`` (the questions run),
  ``llava_vqav2_mscoco_test2015.jsonl`` (every test2015 question: the submission lists them all,
  ``""`` for those not run, as ``convert_vqav2_for_submission.py``) and ``test2015/``.
* ``lmms_lab``: ``data/<split>-*.parquet`` of lmms-lab/VQAv2, ``benchmark.split=testdev`` or
  ``validation`` (which has answers).

``vizwiz`` layouts: ``llava`` (test): ``llava_test.jsonl`` and ``test/``; ``lmms_lab``:
``data/<split>-*.parquet`` of lmms-lab/VizWiz-VQA, ``benchmark.split=test`` or ``val``. Sample ids are
the image names without extension (``VizWiz_test_00000000``).

Submissions hold ``evalai_normalize(prediction)`` (LLaVA's converters). Local accuracy
(``scorer_variant``):

* ``llava``: what EvalAI computes on that submission: the official VQA evaluation
  (``official_vqa_accuracy``), ``100 * sum / n``.
* ``lmms_eval``: ``vqav2_process_results`` for VQAv2, ``vizwiz_vqa_process_results`` for VizWiz.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.base import Scorer, check_choice
from benchmarks.data import Entry, Expected, FileImage, ParquetImage, ParquetTable, read_jsonl
from benchmarks.local import LLAVA_EVAL_DOCS, SHORT_ANSWER, LocalBenchmark, write_json
from benchmarks.registry import register_benchmark
from benchmarks.vqa_accuracy import (
    evalai_normalize,
    lmms_eval_soft_score,
    lmms_eval_vqav2_accuracy,
    official_vqa_accuracy,
)

VIZWIZ_SUFFIX = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER


def _answer_texts(value: Any) -> tuple[str, ...]:
    """Answers as strings, from a list of strings or of ``{"answer": ...}`` dicts; () if none."""
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(str(a["answer"] if isinstance(a, Mapping) else a) for a in value)


class VQAScorer(Scorer):
    """VQA accuracy where answers exist; otherwise only the submitted (normalised) answer."""

    label: ClassVar[str] = "VQAv2"
    lmms_eval_rule = staticmethod(lmms_eval_vqav2_accuracy)

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        submitted = evalai_normalize(prediction)
        if not reference:
            return {"score": None, "parsed_prediction": submitted}
        value = (official_vqa_accuracy(submitted, reference) if self.variant == "llava"
                 else self.lmms_eval_rule(prediction, reference))
        return {"score": value, "parsed_prediction": submitted}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        scores = [r["score"] for r in records if r.get("score") is not None]
        metrics: dict[str, float] = {"answered": len(scores)}
        if scores:
            metrics["accuracy"] = 100 * float(sum(scores)) / len(scores)
        return metrics

    def headline(self, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        if "accuracy" not in metrics:
            return None
        return {"metric": "accuracy", "label": self.label, "value": metrics["accuracy"], "unit": "%"}


class VizWizScorer(VQAScorer):
    label = "VizWiz"
    lmms_eval_rule = staticmethod(lmms_eval_soft_score)


@register_benchmark("vqav2")
class VQAv2(LocalBenchmark):
    """VQAv2 test-dev (or an lmms-lab split); see the module doc."""

    splits: ClassVar[dict[str, tuple[str, ...]]] = {"llava": ("testdev",), "lmms_lab": ("testdev", "validation")}
    sources = {
        "llava": f"{LLAVA_EVAL_DOCS} (the two question files), and COCO test2015 images "
                 "(http://images.cocodataset.org/zips/test2015.zip -> test2015/)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/VQAv2 (data/<split>-*.parquet)",
    }
    suffix: ClassVar[str] = SHORT_ANSWER

    def __init__(self, root: str, layout: str = "llava", split: str = "testdev", scorer_variant: str = "llava",
                 limit: int | None = None, max_new_tokens: int = 128) -> None:
        super().__init__(root=root, layout=layout, scorer_variant=scorer_variant, limit=limit,
                         max_new_tokens=max_new_tokens)
        self.split = check_choice("split", split, self.splits[self.layout])

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> VQAScorer:
        return VQAScorer(variant)

    def _llava_files(self) -> list[Expected]:
        return [Expected("llava_vqav2_mscoco_test-dev2015.jsonl", "LLaVA's test-dev question file"),
                Expected("llava_vqav2_mscoco_test2015.jsonl", "LLaVA's list of every test2015 question"),
                Expected("test2015", "COCO test2015 images")]

    def _llava_entry(self, line: dict | str, position: int) -> Entry:
        if isinstance(line, str):
            return Entry(id=f"line-{position}", error=line)
        if "question_id" not in line or "text" not in line:
            return Entry(id=f"line-{position}", error=f"line {position + 1} lacks question_id or text")
        return Entry(id=str(line["question_id"]), question=line["text"], meta={"question_id": line["question_id"]},
                     image=FileImage(self.root, line.get("image"), "test2015"))

    def _read_llava(self) -> list[Entry]:
        files = self._llava_files()
        self.root.require(files)
        return [self._llava_entry(line, i) for i, line in enumerate(read_jsonl(self.root.file(files[0].path)))]

    def _read_lmms_lab(self) -> list[Entry]:
        pattern = f"data/{self.split}-*.parquet"
        self.root.require([Expected(pattern, f"lmms-lab {self.split} shards")])
        table = ParquetTable(self.root.glob(pattern), ["question_id", "question", "answers"])
        columns = table.columns
        entries = []
        for row in range(len(table)):
            qid, question = columns["question_id"][row], columns["question"][row]
            if qid is None or question is None:
                entries.append(Entry(id=f"row-{row}", error=f"row {row} lacks question_id or question"))
                continue
            entries.append(Entry(id=self._id(qid), question=question + self.suffix,
                                 answers=_answer_texts(columns["answers"][row]), meta={"question_id": qid},
                                 image=ParquetImage(table, row)))
        return entries

    @staticmethod
    def _id(question_id: Any) -> str:
        return str(question_id)

    def write_submission(self, records: Sequence[Mapping[str, Any]], directory: Path) -> list[Path]:
        """``[{"question_id", "answer"}]``; in the llava layout every test2015 question, "" if not run."""
        answers = {r["id"]: evalai_normalize(r["prediction"]) for r in records if "prediction" in r}
        if self.layout == "llava":
            questions = [q["question_id"] for q in read_jsonl(self.root.file(self._llava_files()[1].path))
                         if isinstance(q, dict) and "question_id" in q]
        else:
            questions = [r["meta"]["question_id"] for r in records if "meta" in r]
        rows = [{"question_id": q, "answer": answers.get(str(q), "")} for q in questions]
        return [write_json(directory / f"vqav2_{self.split}_submission.json", rows)]


@register_benchmark("vizwiz")
class VizWiz(VQAv2):
    """VizWiz-VQA test (or an lmms-lab split); see the module doc."""

    splits = {"llava": ("test",), "lmms_lab": ("test", "val")}
    sources = {
        "llava": f"{LLAVA_EVAL_DOCS} (llava_test.jsonl), and VizWiz test images "
                 "(https://vizwiz.org/tasks-and-datasets/vqa/ -> test/)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/VizWiz-VQA (data/<split>-*.parquet)",
    }
    suffix = VIZWIZ_SUFFIX

    def __init__(self, root: str, layout: str = "llava", split: str = "test", scorer_variant: str = "llava",
                 limit: int | None = None, max_new_tokens: int = 128) -> None:
        super().__init__(root=root, layout=layout, split=split, scorer_variant=scorer_variant, limit=limit,
                         max_new_tokens=max_new_tokens)

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> VizWizScorer:
        return VizWizScorer(variant)

    def _llava_files(self) -> list[Expected]:
        return [Expected("llava_test.jsonl", "LLaVA's test question file"), Expected("test", "VizWiz test images")]

    def _llava_entry(self, line: dict | str, position: int) -> Entry:
        if isinstance(line, str):
            return Entry(id=f"line-{position}", error=line)
        if not isinstance(line.get("image"), str) or "text" not in line:
            return Entry(id=f"line-{position}", error=f"line {position + 1} lacks image or text")
        return Entry(id=self._id(line["image"]), question=line["text"], meta={"image": line["image"]},
                     image=FileImage(self.root, line["image"], "test"))

    @staticmethod
    def _id(question_id: Any) -> str:
        return Path(str(question_id)).stem

    def write_submission(self, records: Sequence[Mapping[str, Any]], directory: Path) -> list[Path]:
        """``[{"image", "answer"}]`` for every question run (``convert_vizwiz_for_submission.py``)."""
        rows = [{"image": f"{r['id']}.jpg", "answer": evalai_normalize(r.get("prediction", ""))} for r in records]
        return [write_json(directory / f"vizwiz_{self.split}_submission.json", rows)]
