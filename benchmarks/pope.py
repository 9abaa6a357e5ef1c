"""``pope``: POPE on COCO val2014, splits adversarial, popular and random, as LLaVA's ``eval_pope.py``.

Layouts (``benchmark.root``):

* ``llava``: ``llava_pope_test.jsonl`` (LLaVA's question file, with ``category``),
  ``coco/coco_pope_{adversarial,popular,random}.json`` (POPE's label files, one JSON per line) and
  ``val2014/``. As in ``eval_pope.py``, labels pair with a split's questions *by position*;
  vtclab checks each pair (same image, same question) and fails the samples of a split whose
  files disagree (e.g. a 3,000-question random file against LLaVA's 2,910-question one), instead
  of scoring shifted labels.
* ``lmms_lab``: ``data/test-*.parquet`` (lmms-lab/POPE, 9,000 rows with ``category``).

Sample ids are ``<split>/<POPE question_id>``. The summary's ``questions/<split>`` says how many
questions each split had (LLaVA-1.5 used the POPE commit whose random split has 2,910).

Scoring (``scorer_variant``):

* ``llava``: the text before the first ``.``, commas removed, split on spaces; "No", "not" or "no"
  among the words means no, anything else (empty, "NO", "Nope") means yes. Per split: accuracy,
  precision, recall, F1 and the yes-ratio of the predictions; a split with no "yes" prediction
  has no precision (the official script divides by zero). ``f1`` is the mean F1 over the splits,
  what LLaVA-NeXT papers print as POPE.
* ``lmms_eval``: ``pope_process_results``: exact "yes"/"no" after lower/strip (other answers count
  in neither TP nor FN), and its yes-ratio counts *ground-truth* yes, as lmms-eval does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.base import Scorer
from benchmarks.data import Entry, Expected, FileImage, ParquetImage, ParquetTable, read_jsonl
from benchmarks.local import LLAVA_EVAL_DOCS, SHORT_ANSWER, LocalBenchmark
from benchmarks.registry import register_benchmark

SPLITS: tuple[str, ...] = ("adversarial", "popular", "random")
LLAVA_QUESTIONS = "llava_pope_test.jsonl"
IMAGES = "val2014"
LMMS_SHARDS = "data/test-*.parquet"


def label_file(split: str) -> str:
    return f"coco/coco_pope_{split}.json"


def parse_official(prediction: str) -> str:
    """``eval_pope.py``'s yes/no rule."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _percent(value: float | None) -> float | None:
    return None if value is None else value * 100


class POPEScorer(Scorer):
    """Per-split precision / recall / F1 (see the module doc)."""

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        if self.variant == "llava":
            parsed = parse_official(prediction)
            label = "no" if reference[0] == "no" else "yes"  # the official maps every label but "no" to yes
        else:
            parsed = prediction.lower().strip()
            label = reference[0].lower().strip()
        return {"score": float(parsed == label), "parsed_prediction": parsed}

    def _split_metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
        predictions = [r["parsed_prediction"] for r in records]
        if self.variant == "llava":
            labels = ["no" if r["reference"][0] == "no" else "yes" for r in records]
            tp = sum(p == "yes" and g == "yes" for p, g in zip(predictions, labels))
            fp = sum(p == "yes" and g == "no" for p, g in zip(predictions, labels))
            tn = sum(p == "no" and g == "no" for p, g in zip(predictions, labels))
            fn = sum(p == "no" and g == "yes" for p, g in zip(predictions, labels))
            precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            f1 = (2 * precision * recall / (precision + recall)
                  if precision is not None and recall is not None and precision + recall else None)
            return {"accuracy": (tp + tn) / (tp + tn + fp + fn), "precision": precision, "recall": recall, "f1": f1,
                    "yes_ratio": predictions.count("yes") / len(predictions)}
        labels = [r["reference"][0].lower().strip() for r in records]
        tp = sum(p == "yes" and g == "yes" for p, g in zip(predictions, labels))
        fp = sum(p == "yes" and g == "no" for p, g in zip(predictions, labels))
        fn = sum(p == "no" and g == "yes" for p, g in zip(predictions, labels))
        precision = tp / (tp + fp) if tp + fp > 0 else 0
        recall = tp / (tp + fn) if tp + fn > 0 else 0
        f1 = 2 * (precision * recall) / (precision + recall) if precision + recall > 0 else 0
        gold_yes, gold_no = labels.count("yes"), labels.count("no")
        return {"accuracy": sum(float(r["score"]) for r in records) / len(records), "precision": precision,
                "recall": recall, "f1": f1,
                "yes_ratio": gold_yes / (gold_yes + gold_no) if gold_yes + gold_no > 0 else 0}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
        by_split: dict[str, list[Mapping[str, Any]]] = {}
        for record in records:
            by_split.setdefault(record["meta"]["category"], []).append(record)
        splits = [s for s in SPLITS if s in by_split] + sorted(set(by_split) - set(SPLITS))
        metrics: dict[str, float | None] = {}
        per_split = {split: self._split_metrics(by_split[split]) for split in splits}
        for name in ("f1", "accuracy"):
            values = [per_split[s][name] for s in splits]
            if values and None not in values:
                metrics[name] = sum(values) / len(values) * 100
        for split in splits:
            for name, value in per_split[split].items():
                metrics[f"{name}/{split}"] = _percent(value)
            metrics[f"questions/{split}"] = len(by_split[split])
        return metrics

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
        if metrics.get("f1") is None:
            return None
        return {"metric": "f1", "label": "POPE", "value": metrics["f1"], "unit": "%"}


@register_benchmark("pope")
class POPE(LocalBenchmark):
    """POPE, three splits; see the module doc for files and scoring."""

    sources = {
        "llava": f"{LLAVA_EVAL_DOCS} (llava_pope_test.jsonl), POPE's label files "
                 "(https://github.com/AoiDragon/POPE/tree/e3e39262c85a6a83f26cf5094022a782cb0df58d/output/coco "
                 "-> coco/) and COCO val2014 images (http://images.cocodataset.org/zips/val2014.zip -> val2014/)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/POPE (data/test-*.parquet)",
    }

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> POPEScorer:
        return POPEScorer(variant)

    def _read_llava(self) -> list[Entry]:
        self.root.require([Expected(LLAVA_QUESTIONS, "LLaVA's question file"),
                           *(Expected(label_file(s), f"POPE {s} labels") for s in SPLITS),
                           Expected(IMAGES, "COCO val2014 images")])
        labels = {s: read_jsonl(self.root.file(label_file(s))) for s in SPLITS}
        position = dict.fromkeys(SPLITS, 0)
        entries = []
        for index, line in enumerate(read_jsonl(self.root.file(LLAVA_QUESTIONS))):
            if isinstance(line, str) or line.get("category") not in SPLITS:
                reason = line if isinstance(line, str) else (f"line {index + 1} of {LLAVA_QUESTIONS} has category "
                                                             f"{line.get('category')!r}; allowed: {', '.join(SPLITS)}")
                entries.append(Entry(id=f"line-{index}", error=reason))
                continue
            split = line["category"]
            k = position[split]
            position[split] = k + 1
            label = labels[split][k] if k < len(labels[split]) else None
            if not isinstance(label, dict) or "label" not in label:
                entries.append(Entry(id=f"{split}/position-{k}", error=f"{label_file(split)} has no label at position "
                                     f"{k} ({len(labels[split])} lines) for question {line.get('question_id')}"))
                continue
            sample_id = f"{split}/{label.get('question_id', f'position-{k}')}"
            text, image = line.get("text"), line.get("image")
            if not isinstance(text, str) or image != label.get("image") or not text.startswith(str(label.get("text"))):
                entries.append(Entry(id=sample_id, error=(
                    f"{LLAVA_QUESTIONS} and {label_file(split)} disagree at {split} position {k}: "
                    f"{image!r} {text!r} vs {label.get('image')!r} {label.get('text')!r} (files of different POPE "
                    "versions? LLaVA's random split has 2,910 questions, the current POPE one 3,000)")))
                continue
            entries.append(Entry(id=sample_id, question=text, answers=(str(label["label"]),),
                                 meta={"category": split, "question_id": line.get("question_id")},
                                 image=FileImage(self.root, image, IMAGES)))
        return entries

    def _read_lmms_lab(self) -> list[Entry]:
        self.root.require([Expected(LMMS_SHARDS, "lmms-lab/POPE test shards")])
        table = ParquetTable(self.root.glob(LMMS_SHARDS), ["question_id", "question", "answer", "category"])
        columns = table.columns
        entries = []
        for row in range(len(table)):
            split, qid = columns["category"][row], columns["question_id"][row]
            if split not in SPLITS or columns["question"][row] is None or columns["answer"][row] is None:
                entries.append(Entry(id=f"row-{row}", error=f"row {row}: category {split!r} (allowed: "
                                     f"{', '.join(SPLITS)}) or question/answer missing"))
                continue
            entries.append(Entry(id=f"{split}/{qid}", question=columns["question"][row].strip() + SHORT_ANSWER,
                                 answers=(str(columns["answer"][row]),), meta={"category": split, "question_id": qid},
                                 image=ParquetImage(table, row)))
        return entries
