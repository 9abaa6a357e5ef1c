"""``textvqa``: TextVQA val v0.5.1 (5,000 questions), VQA soft accuracy as LLaVA's m4c evaluator.

Layouts (``benchmark.root``):

* ``llava``: ``llava_textvqa_val_v051_ocr.jsonl`` (LLaVA's question file; its ``question_id`` is the
  TextVQA *image* id), ``TextVQA_0.5.1_val.json`` (official annotations, 10 answers each),
  ``train_images/``. Questions are joined to annotations exactly as ``eval_textvqa.py`` does:
  on ``(image_id, prompt_processor(text))``, where a repeated key keeps the last annotation.
  Sample ids are the official TextVQA ``question_id``.
* ``lmms_lab``: ``data/validation-*.parquet`` (lmms-lab/textvqa); the prompt is rebuilt in the form
  of LLaVA's file: the capitalised question, ``Reference OCR token: t1, t2, ...`` (the line is
  there even with no tokens), the short-answer suffix.

``ocr_tokens=false`` drops the ``Reference OCR token: ...`` line (lmms-eval's default prompt, and
what GlobalCom2's committed loader does by keeping only lines 0, 1 and 3 of the prompt).

Scoring: ``llava`` is ``TextVQAAccuracyEvaluator`` (exactly 10 answers, ``evalai_normalize``, mean
of the leave-one-out terms); ``lmms_eval`` is lmms-eval's ``textvqa_process_results`` (the same
normaliser, ``statistics.mean``). Accuracy is ``100 * (sum / n)``, as LLaVA prints it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.base import Scorer, SampleError
from benchmarks.data import Entry, Expected, FileImage, ParquetImage, ParquetTable, read_jsonl
from benchmarks.local import LLAVA_EVAL_DOCS, SHORT_ANSWER, LocalBenchmark
from benchmarks.registry import register_benchmark
from benchmarks.vqa_accuracy import evalai_normalize, lmms_eval_soft_score, m4c_soft_score

LLAVA_QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"
ANNOTATIONS = "TextVQA_0.5.1_val.json"
IMAGES = "train_images"
LMMS_SHARDS = "**/validation-*.parquet"
OCR_PREFIX = "Reference OCR token: "


def prompt_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt, lower-cased (``eval_textvqa.prompt_processor``)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise SampleError(f"unrecognised TextVQA prompt {prompt!r}")
        question = match.group(1)
    elif OCR_PREFIX in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(OCR_PREFIX.rstrip()) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise SampleError(f"unrecognised TextVQA prompt {prompt!r} (LLaVA's evaluator asserts on it)")
    return question.lower()


def without_ocr_line(prompt: str) -> str:
    """The prompt without its ``Reference OCR token:`` line."""
    return "\n".join(line for line in prompt.split("\n") if not line.startswith(OCR_PREFIX))


class TextVQAScorer(Scorer):
    """VQA soft accuracy over TextVQA's 10 answers (see the module doc)."""

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        rule = m4c_soft_score if self.variant == "llava" else lmms_eval_soft_score
        return {"score": rule(prediction, reference), "parsed_prediction": evalai_normalize(prediction)}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        scores = [r["score"] for r in records]
        return {"accuracy": 100.0 * (sum(scores) / len(scores))} if scores else {}

    def headline(self, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        if "accuracy" not in metrics:
            return None
        return {"metric": "accuracy", "label": "TextVQA", "value": metrics["accuracy"], "unit": "%"}


@register_benchmark("textvqa")
class TextVQA(LocalBenchmark):
    """TextVQA val; see the module doc for files, prompt and scoring."""

    sources = {
        "llava": f"{LLAVA_EVAL_DOCS} (question file), and https://textvqa.org/dataset "
                 "(TextVQA_0.5.1_val.json, train_val_images.zip -> train_images/)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/textvqa (data/validation-*.parquet)",
    }

    def __init__(self, root: str, layout: str = "llava", scorer_variant: str = "llava", ocr_tokens: bool = True,
                 limit: int | None = None, max_new_tokens: int = 128) -> None:
        super().__init__(root=root, layout=layout, scorer_variant=scorer_variant, limit=limit,
                         max_new_tokens=max_new_tokens)
        if not isinstance(ocr_tokens, bool):
            raise ValueError(f"benchmark.ocr_tokens must be true or false, got {ocr_tokens!r}")
        self.ocr_tokens = ocr_tokens

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> TextVQAScorer:
        return TextVQAScorer(variant)

    def _entry(self, qid: str, prompt: str, answers: Any, meta: dict, image) -> Entry:
        if not isinstance(answers, (list, tuple)) or len(answers) != 10:
            count = len(answers) if isinstance(answers, (list, tuple)) else answers
            return Entry(id=qid, error=f"question {qid} has {count} answers; TextVQA's evaluator needs exactly 10")
        prompt = prompt if self.ocr_tokens else without_ocr_line(prompt)
        return Entry(id=qid, question=prompt, answers=tuple(str(a) for a in answers), meta=meta, image=image)

    def _read_llava(self) -> list[Entry]:
        self.root.require([Expected(LLAVA_QUESTIONS, "LLaVA's question file"),
                           Expected(ANNOTATIONS, "official TextVQA val annotations"),
                           Expected(IMAGES, "TextVQA train/val images")])
        annotations: dict[tuple[Any, str], list[dict]] = {}
        for annotation in self.root.load_json(ANNOTATIONS).get("data", []):
            annotations.setdefault((annotation["image_id"], annotation["question"].lower()), []).append(annotation)
        seen: dict[tuple[Any, str], int] = {}
        entries = []
        for position, line in enumerate(read_jsonl(self.root.file(LLAVA_QUESTIONS))):
            if isinstance(line, str):
                entries.append(Entry(id=f"line-{position}", error=line))
                continue
            try:
                key = (line["question_id"], prompt_question(line["text"]))
                matches = annotations[key]
            except (KeyError, TypeError, AttributeError, SampleError) as error:
                entries.append(Entry(id=f"line-{position}", error=f"line {position + 1} of {LLAVA_QUESTIONS} matches "
                                                                   f"no annotation: {error}"))
                continue
            # LLaVA's dict keeps the last annotation of a repeated key: every such line is scored
            # against it; the k-th line still gets the k-th question's id, so ids stay unique.
            occurrence = seen.get(key, 0)
            seen[key] = occurrence + 1
            qid = str(matches[min(occurrence, len(matches) - 1)]["question_id"])
            entries.append(self._entry(qid, line["text"], matches[-1].get("answers"),
                                       {"image_id": line["question_id"]},
                                       FileImage(self.root, line.get("image"), IMAGES)))
        return entries

    def _read_lmms_lab(self) -> list[Entry]:
        self.root.require([Expected(LMMS_SHARDS, "lmms-lab/textvqa validation shards")])
        table = ParquetTable(self.root.glob(LMMS_SHARDS), ["question_id", "image_id", "question", "answers",
                                                            "ocr_tokens"])
        columns = table.columns
        entries = []
        for row in range(len(table)):
            qid = str(columns["question_id"][row])
            question = columns["question"][row]
            if question is None:
                entries.append(Entry(id=qid, error=f"question {qid} has no text"))
                continue
            tokens = columns["ocr_tokens"][row] or []
            prompt = f"{question.capitalize()}\n{OCR_PREFIX}{', '.join(tokens)}{SHORT_ANSWER}"
            entries.append(self._entry(qid, prompt, columns["answers"][row],
                                       {"image_id": columns["image_id"][row]}, ParquetImage(table, row)))
        return entries
