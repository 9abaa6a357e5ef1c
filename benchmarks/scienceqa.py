"""``scienceqa_img``: ScienceQA test, image questions (2,017), scored as LLaVA's ``eval_science_qa.py``.

Layouts (``benchmark.root``):

* ``llava``: ``llava_test_CQM-A.json`` (LLaVA's question file: the questions with an ``image`` are
  the IMG subset), ``problems.json`` (official, the answers) and ``images/test/<pid>/image.png``.
  The prompt is the file's human turn without ``<image>``, plus the letter suffix
  (``--single-pred-prompt``).
* ``lmms_lab``: ``ScienceQA-IMG/test-*.parquet`` (lmms-lab/ScienceQA); the prompt is lmms-eval's
  (``Context: <hint>`` when there is one, the question, ``A. ...`` lines, the letter suffix).

The lmms-lab release has no problem id, so sample ids are content ids in both layouts: the first
12 hex digits of SHA-1 over (question, choices, hint, answer index), with ``-k`` for the k-th repeat.

Scoring (``scorer_variant``):

* ``llava``: the letter is the prediction if it is one of A-E; else its first character when
  followed by ". " (so a bare "A." is rejected); else the single match of
  ``The answer is ([A-Z]).``; else "FAILED" (wrong). ``img_accuracy`` = correct / total * 100.
* ``lmms_eval``: ``sqa_process_results``: case-insensitive exact letter, or an upper-case letter
  followed by "." (so "A." is accepted).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.base import Scorer
from benchmarks.data import Entry, Expected, FileImage, ParquetImage, ParquetTable
from benchmarks.local import LETTER_ANSWER, LLAVA_EVAL_DOCS, LocalBenchmark
from benchmarks.registry import register_benchmark

OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")
LLAVA_QUESTIONS = "llava_test_CQM-A.json"
PROBLEMS = "problems.json"
IMAGES = "images/test"
LMMS_SHARDS = "ScienceQA-IMG/test-*.parquet"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_official(prediction: str) -> str:
    """``eval_science_qa.py``'s letter parser (options A-E)."""
    if prediction in OPTIONS:
        return prediction
    if len(prediction) >= 3 and prediction[0] in OPTIONS and prediction[1:3] == ". ":
        return prediction[0]
    found = _ANSWER_IS.findall(prediction)
    return found[0] if len(found) == 1 else "FAILED"


def parse_lmms_eval(prediction: str) -> str:
    """The letter lmms-eval's ``sqa_process_results`` compares (upper-cased), or "" if none."""
    text = prediction.strip()
    if len(text) == 1:
        return text.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return text[0]
    return ""


def content_id(question: str, choices: Sequence[str], hint: str, answer: int) -> str:
    payload = json.dumps([question, list(choices), hint, int(answer)], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:12]


def with_repeats(ids: list[str]) -> list[str]:
    """``x``, ``x-1``, ``x-2`` ... for repeated content ids, in order."""
    seen: dict[str, int] = {}
    out = []
    for id_ in ids:
        k = seen.get(id_, 0)
        seen[id_] = k + 1
        out.append(id_ if k == 0 else f"{id_}-{k}")
    return out


class ScienceQAScorer(Scorer):
    """Letter accuracy on the image questions (see the module doc)."""

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        target = reference[0]
        if self.variant == "llava":
            parsed = parse_official(prediction)
            within = parsed in OPTIONS[: int(meta["num_choices"])]  # get_pred_idx: -1 outside the choices
            return {"score": float(within and parsed == target), "parsed_prediction": parsed}
        text = prediction.strip()
        if text.lower() == target.strip().lower():
            correct = True
        elif len(text) >= 2 and text[0].isupper() and text[1] == ".":
            correct = text[0].lower() == target.strip().lower()
        else:
            correct = False
        return {"score": float(correct), "parsed_prediction": parse_lmms_eval(prediction)}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        correct = sum(r["score"] == 1.0 for r in records)
        if self.variant == "llava":
            return {"img_accuracy": correct / len(records) * 100}
        return {"img_accuracy": sum(float(r["score"]) for r in records) / len(records) * 100}

    def headline(self, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        if "img_accuracy" not in metrics:
            return None
        return {"metric": "img_accuracy", "label": "SQA-IMG", "value": metrics["img_accuracy"], "unit": "%"}


@register_benchmark("scienceqa_img")
class ScienceQAImg(LocalBenchmark):
    """ScienceQA test, image questions; see the module doc for files and scoring."""

    sources = {
        "llava": f"{LLAVA_EVAL_DOCS} (llava_test_CQM-A.json), and ScienceQA "
                 "(https://github.com/lupantech/ScienceQA: data/scienceqa/problems.json, test images -> images/test/)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/ScienceQA (ScienceQA-IMG/test-*.parquet)",
    }

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> ScienceQAScorer:
        return ScienceQAScorer(variant)

    @staticmethod
    def _problem_fields(problem: Mapping[str, Any]) -> tuple[str, list[str], str, int]:
        return problem["question"], list(problem["choices"]), problem.get("hint") or "", int(problem["answer"])

    def _read_llava(self) -> list[Entry]:
        self.root.require([Expected(LLAVA_QUESTIONS, "LLaVA's question file"),
                           Expected(PROBLEMS, "official ScienceQA problems (answers)"),
                           Expected(IMAGES, "ScienceQA test images")])
        problems = self.root.load_json(PROBLEMS)
        items = self.root.load_json(LLAVA_QUESTIONS)
        entries, keys = [], []
        for position, item in enumerate(items if isinstance(items, list) else []):
            if not isinstance(item, dict) or "image" not in item:
                continue  # text-only questions are not in the IMG subset
            pid = str(item.get("id"))
            problem = problems.get(pid) if isinstance(problems, dict) else None
            try:
                question, choices, hint, answer = self._problem_fields(problem)
                prompt = item["conversations"][0]["value"].replace("<image>", "").strip() + LETTER_ANSWER
                letter = OPTIONS[answer]
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
                entries.append(Entry(id=f"pid-{pid}", error=f"problem {pid} is malformed or missing from "
                                                            f"{PROBLEMS}: {error!r}"))
                keys.append(f"pid-{pid}")
                continue
            keys.append(content_id(question, choices, hint, answer))
            entries.append(Entry(id="", question=prompt, answers=(letter,),
                                 meta={"pid": pid, "num_choices": len(choices)},
                                 image=FileImage(self.root, item["image"], IMAGES)))
        for entry, id_ in zip(entries, with_repeats(keys)):
            entry.id = id_
        return entries

    def _read_lmms_lab(self) -> list[Entry]:
        self.root.require([Expected(LMMS_SHARDS, "lmms-lab/ScienceQA ScienceQA-IMG test shard")])
        table = ParquetTable(self.root.glob(LMMS_SHARDS), ["question", "choices", "answer", "hint"])
        columns = table.columns
        entries, keys = [], []
        for row in range(len(table)):
            try:
                question, choices, hint, answer = self._problem_fields({k: columns[k][row] for k in columns})
                letter = OPTIONS[answer]
            except (KeyError, IndexError, TypeError, ValueError) as error:
                entries.append(Entry(id=f"row-{row}", error=f"row {row} is malformed: {error!r}"))
                keys.append(f"row-{row}")
                continue
            context = f"Context: {hint}\n" if hint else ""
            lines = "\n".join(f"{letter}. {choice}" for letter, choice in zip(OPTIONS, choices))
            keys.append(content_id(question, choices, hint, answer))
            entries.append(Entry(id="", question=f"{context}{question}\n{lines}{LETTER_ANSWER}",
                                 answers=(letter,), meta={"num_choices": len(choices)},
                                 image=ParquetImage(table, row)))
        for entry, id_ in zip(entries, with_repeats(keys)):
            entry.id = id_
        return entries
