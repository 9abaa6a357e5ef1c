"""``mme``: MME (2,374 yes/no questions on 1,187 images), scored as the official ``calculation.py``.

Layouts (``benchmark.root``):

* ``llava``: ``llava_mme.jsonl`` (LLaVA's question file) and ``MME_Benchmark_release_version/``
  (the official release: ``<subtask>/images/`` + ``<subtask>/questions_answers_YN/*.txt`` for
  artwork, celebrity, landmark, posters and scene, images and ``.txt`` side by side for the
  others). Gold answers are looked up as LLaVA's ``convert_answer_to_mme.py`` does: by subtask,
  the image's ``.txt`` name and the question with " Please answer yes or no." restored (trying
  the release's double-space variant when the single-space one is missing).
* ``lmms_lab``: ``data/test-*.parquet`` (lmms-lab/MME); the prompt is the question with
  " Please answer yes or no." (and the space before it) replaced by the short-answer suffix, the
  format of LLaVA's file.

Sample ids are ``<subtask>/<image file>#<k>``, k the question's position among its image's
questions in the source file.

Scoring (``scorer_variant``):

* ``llava``: ``parse_pred_ans(pred.lower())``: "yes"/"no" when exact, else "yes" if "yes" is in the
  first 4 characters, else "no" if "no" is, else "other" (wrong). Per subtask: ``acc`` over
  questions, ``acc+`` over images with both questions right; score = 100 acc + 100 acc+ (max
  200). Perception sums the 10 perception subtasks (max 2000), Cognition the 4 others (max 800).
  Images are grouped by their key, not by adjacent lines, so resumed runs score the same.
* ``lmms_eval``: ``mme_process_results``: lower/strip, periods removed, a lone "y"/"n" accepted;
  per subtask the mean over images of (acc + acc+) in points.

A prediction spanning several lines would break the official text-file format (one answer per
line); vtclab scores it as one answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.base import Scorer
from benchmarks.data import Entry, Expected, FileImage, ParquetImage, ParquetTable, read_jsonl
from benchmarks.local import LLAVA_EVAL_DOCS, SHORT_ANSWER, LocalBenchmark
from benchmarks.registry import register_benchmark

PERCEPTION: tuple[str, ...] = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                               "artwork", "OCR")
COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
LLAVA_QUESTIONS = "llava_mme.jsonl"
RELEASE = "MME_Benchmark_release_version"
LMMS_SHARDS = "data/test-*.parquet"
YES_NO = " Please answer yes or no."
SHORT_ANSWER_TEXT = SHORT_ANSWER.strip()
_YES_NO_TAIL = re.compile(r"\s*Please answer yes or no\.")


def parse_official(prediction: str) -> str:
    """``calculation.py``'s ``parse_pred_ans`` on the lower-cased prediction."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def parse_lmms_eval(prediction: str) -> str:
    """lmms-eval's ``parse_pred_ans`` (Otter's): periods removed, a lone "y"/"n" accepted."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


class MMEScorer(Scorer):
    """MME in points (see the module doc)."""

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        if self.variant == "llava":
            parsed, gold = parse_official(prediction), reference[0].lower()
        else:
            parsed, gold = parse_lmms_eval(prediction), reference[0].lower().strip().replace(".", "")
        return {"score": float(parsed == gold), "parsed_prediction": parsed}

    @staticmethod
    def _by_subtask(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
        """subtask -> image key -> scores, both in first-seen order."""
        grouped: dict[str, dict[str, list[float]]] = {}
        for record in records:
            meta = record["meta"]
            grouped.setdefault(meta["category"], {}).setdefault(meta["image"], []).append(float(record["score"]))
        return grouped

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        grouped = self._by_subtask(records)
        metrics: dict[str, float] = {}
        subtask_scores: dict[str, float] = {}
        for subtask, images in grouped.items():
            if self.variant == "llava":
                scores = [s for image in images.values() for s in image]
                acc = sum(scores) / len(scores)
                acc_plus = sum(sum(image) == 2 for image in images.values()) / len(images)
                total = 0.0
                total += acc * 100
                total += acc_plus * 100
                metrics[f"acc/{subtask}"] = acc * 100
                metrics[f"acc_plus/{subtask}"] = acc_plus * 100
            else:
                total = 0.0
                for image in images.values():
                    total += (sum(image) == 2) * 100.0 + sum(image) / len(image) * 100.0
                total = total / len(images)
            subtask_scores[subtask] = total
            metrics[f"score/{subtask}"] = total
        for name, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
            order = members if self.variant == "llava" else [s for s in subtask_scores if s in members]
            present = [s for s in order if s in subtask_scores]
            if present:
                total = 0
                for subtask in present:
                    total += subtask_scores[subtask]
                metrics[name] = total
        return dict(sorted(metrics.items(), key=lambda item: (item[0].count("/"), item[0])))

    def headline(self, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        if "perception" not in metrics:
            return None
        return {"metric": "perception", "label": "MME-P", "value": metrics["perception"], "unit": "points"}


def image_key(question_id: str) -> tuple[str, str]:
    """(subtask, ``<subtask>/<file>``) of a question id such as ``artwork/images/10002.jpg``."""
    parts = question_id.split("/")
    return parts[0], f"{parts[0]}/{parts[-1]}"


@register_benchmark("mme")
class MME(LocalBenchmark):
    """MME; see the module doc for files and scoring."""

    sources = {
        "llava": f"{LLAVA_EVAL_DOCS} (llava_mme.jsonl), and the MME release "
                 "(https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation, "
                 "MME_Benchmark_release_version/)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/MME (data/test-*.parquet)",
    }

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> MMEScorer:
        return MMEScorer(variant)

    def _gold(self) -> dict[tuple[str, str, str], str]:
        """(subtask, txt file, question) -> answer, from the release folder."""
        gold: dict[tuple[str, str, str], str] = {}
        release = self.root.file(RELEASE)
        for subtask_dir in sorted(p for p in release.iterdir() if p.is_dir()):
            qa_dir = subtask_dir / "questions_answers_YN" if (subtask_dir / "images").is_dir() else subtask_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                for line in txt.read_text(encoding="utf-8").splitlines():
                    fields = line.strip().split("\t")
                    if len(fields) == 2:
                        gold[(subtask_dir.name, txt.name, fields[0])] = fields[1]
        return gold

    def _read_llava(self) -> list[Entry]:
        self.root.require([Expected(LLAVA_QUESTIONS, "LLaVA's question file"),
                           Expected(RELEASE, "the official MME release (images and yes/no answer files)")])
        gold = self._gold()
        entries, counts = [], {}
        for position, line in enumerate(read_jsonl(self.root.file(LLAVA_QUESTIONS))):
            if isinstance(line, str) or not isinstance(line.get("question_id"), str) or "text" not in line:
                entries.append(Entry(id=f"line-{position}", error=line if isinstance(line, str) else
                                     f"line {position + 1} of {LLAVA_QUESTIONS} lacks question_id or text"))
                continue
            subtask, key = image_key(line["question_id"])
            txt = line["question_id"].split("/")[-1].split(".")[0] + ".txt"
            question = line["text"].replace(SHORT_ANSWER_TEXT, "").strip() if SHORT_ANSWER_TEXT in line["text"] \
                else line["text"]
            if YES_NO.strip() not in question:
                question = question + YES_NO
                if (subtask, txt, question) not in gold:
                    question = question.replace(YES_NO, " " + YES_NO)
            k = counts.get(key, 0)
            counts[key] = k + 1
            answer = gold.get((subtask, txt, question))
            if answer is None:
                entries.append(Entry(id=f"{key}#{k}", error=f"no gold answer for {question!r} in {subtask}/{txt}"))
                continue
            entries.append(Entry(id=f"{key}#{k}", question=line["text"], answers=(answer,),
                                 meta={"category": subtask, "image": key},
                                 image=FileImage(self.root, line.get("image"), RELEASE)))
        return entries

    def _read_lmms_lab(self) -> list[Entry]:
        self.root.require([Expected(LMMS_SHARDS, "lmms-lab/MME test shards")])
        table = ParquetTable(self.root.glob(LMMS_SHARDS), ["question_id", "question", "answer", "category"])
        columns = table.columns
        entries, counts = [], {}
        for row in range(len(table)):
            qid, question, answer = columns["question_id"][row], columns["question"][row], columns["answer"][row]
            if not isinstance(qid, str) or question is None or answer is None:
                entries.append(Entry(id=f"row-{row}", error=f"row {row} lacks question_id, question or answer"))
                continue
            subtask, key = image_key(qid)
            k = counts.get(key, 0)
            counts[key] = k + 1
            prompt = _YES_NO_TAIL.sub("", question.strip()) + SHORT_ANSWER
            entries.append(Entry(id=f"{key}#{k}", question=prompt, answers=(str(answer),),
                                 meta={"category": columns["category"][row] or subtask, "image": key},
                                 image=ParquetImage(table, row)))
        return entries
