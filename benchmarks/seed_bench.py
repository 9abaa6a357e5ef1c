"""``seed_bench``: SEED-Bench image questions, as LLaVA's ``convert_seed_for_submission.py`` scores them.

Layouts (``benchmark.root``):

* ``llava``: ``SEED-Bench.json`` (official: ``questions`` with ``data_type``, ``question_type_id``,
  ``answer``; ``question_type`` names), ``llava-seed-bench.jsonl`` (LLaVA's question file, prompts
  with ``A. ...`` option lines) and ``SEED-Bench-image/``. Only ``data_type == "image"`` questions
  are listed: the papers report image accuracy.
* ``lmms_lab``: ``data/test-*.parquet`` (lmms-lab/SEED-Bench); the prompt is lmms-eval's (question,
  four option lines, the letter suffix).

Scoring (``scorer_variant``):

* ``llava``: correct iff the prediction *equals* the answer letter (no normalisation); accuracy per
  question type and over all image questions, ``correct / count * 100``.
* ``lmms_eval``: the first character of the stripped prediction, compared case-insensitively.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.base import Scorer
from benchmarks.data import Entry, Expected, FileImage, ParquetImage, ParquetTable, read_jsonl
from benchmarks.local import LETTER_ANSWER, LLAVA_EVAL_DOCS, LocalBenchmark
from benchmarks.registry import register_benchmark

ANNOTATIONS = "SEED-Bench.json"
LLAVA_QUESTIONS = "llava-seed-bench.jsonl"
LMMS_SHARDS = "data/test-*.parquet"
# SEED-Bench (v1) question types 1-9 are the image dimensions (SEED-Bench.json's ``question_type``).
IMAGE_TYPES = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
               5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
               9: "Text Understanding"}


class SEEDScorer(Scorer):
    """Image accuracy, overall and per question type (see the module doc)."""

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        if self.variant == "llava":
            return {"score": float(prediction == reference[0]), "parsed_prediction": prediction}
        parsed = prediction.strip()
        parsed = parsed[0] if len(parsed) > 1 else parsed
        return {"score": float(parsed.lower().strip() == reference[0].lower().strip()), "parsed_prediction": parsed}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        if self.variant == "lmms_eval":
            return {"accuracy": sum(r["score"] == 1.0 for r in records) / len(records) * 100}
        counts: dict[int, int] = {}
        correct: dict[int, int] = {}
        for record in records:
            kind = int(record["meta"]["question_type_id"])
            counts[kind] = counts.get(kind, 0) + 1
            correct[kind] = correct.get(kind, 0) + (record["score"] == 1.0)
        metrics = {}
        total_count = total_correct = 0
        for kind in sorted(counts):
            metrics[f"accuracy/{IMAGE_TYPES.get(kind, f'type {kind}')}"] = correct[kind] / counts[kind] * 100
            total_count += counts[kind]
            total_correct += correct[kind]
        return {"accuracy": total_correct / total_count * 100, **metrics}

    def headline(self, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        if "accuracy" not in metrics:
            return None
        return {"metric": "accuracy", "label": "SEED-I", "value": metrics["accuracy"], "unit": "%"}


def _qid(value: Any) -> str:
    return str(value)


@register_benchmark("seed_bench")
class SEEDBench(LocalBenchmark):
    """SEED-Bench, image questions; see the module doc for files and scoring."""

    sources = {
        "llava": f"{LLAVA_EVAL_DOCS} (llava-seed-bench.jsonl), and SEED-Bench "
                 "(https://huggingface.co/datasets/AILab-CVC/SEED-Bench: SEED-Bench.json, SEED-Bench-image.zip)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/SEED-Bench (data/test-*.parquet)",
    }

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> SEEDScorer:
        return SEEDScorer(variant)

    def _read_llava(self) -> list[Entry]:
        self.root.require([Expected(ANNOTATIONS, "official SEED-Bench questions and answers"),
                           Expected(LLAVA_QUESTIONS, "LLaVA's question file"),
                           Expected("SEED-Bench-image", "SEED-Bench images")])
        annotations = self.root.load_json(ANNOTATIONS)
        questions = {_qid(q.get("question_id")): q for q in annotations.get("questions", []) if isinstance(q, dict)}
        entries = []
        for position, line in enumerate(read_jsonl(self.root.file(LLAVA_QUESTIONS))):
            if isinstance(line, str):
                entries.append(Entry(id=f"line-{position}", error=line))
                continue
            qid = _qid(line.get("question_id", f"line-{position}"))
            question = questions.get(qid)
            if question is None:
                entries.append(Entry(id=qid, error=f"question {qid} is not in {ANNOTATIONS}"))
            elif question.get("data_type") != "image":
                continue  # video questions are not part of the image score
            elif "text" not in line or "answer" not in question:
                entries.append(Entry(id=qid, error=f"question {qid} lacks its prompt or answer"))
            else:
                entries.append(Entry(id=qid, question=line["text"], answers=(str(question["answer"]),),
                                     meta={"question_type_id": int(question.get("question_type_id", 0))},
                                     image=FileImage(self.root, line.get("image"))))
        return entries

    def _read_lmms_lab(self) -> list[Entry]:
        self.root.require([Expected(LMMS_SHARDS, "lmms-lab/SEED-Bench test shards")])
        table = ParquetTable(self.root.glob(LMMS_SHARDS), ["question_id", "question", "choice_a", "choice_b",
                                                            "choice_c", "choice_d", "answer", "data_type",
                                                            "question_type_id"])
        columns = table.columns
        entries = []
        for row in range(len(table)):
            if columns["data_type"][row] != "image":
                continue
            qid = _qid(columns["question_id"][row])
            fields = [columns[k][row] for k in ("question", "choice_a", "choice_b", "choice_c", "choice_d", "answer")]
            if any(f is None for f in fields):
                entries.append(Entry(id=qid, error=f"question {qid} lacks its question, a choice or the answer"))
                continue
            question, a, b, c, d, answer = fields
            prompt = f"{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}{LETTER_ANSWER}"
            entries.append(Entry(id=qid, question=prompt, answers=(str(answer),),
                                 meta={"question_type_id": int(columns["question_type_id"][row] or 0)},
                                 image=ParquetImage(table, row)))
        return entries

    def write_submission(self, records: Sequence[Mapping[str, Any]], directory: Path) -> list[Path]:
        """LLaVA's upload file: one ``{"question_id", "prediction"}`` line per question run."""
        path = directory / "seed_bench_upload.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps({"question_id": record["id"], "prediction": record.get("prediction", "")},
                                        ensure_ascii=False) + "\n")
        return [path]
