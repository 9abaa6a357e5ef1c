"""``mmbench`` and ``mmbench_cn``: MMBench dev (TSV with base64 images), the prompt LLaVA builds, a
local score where the data has answers, and the submission file the official server takes.

Layouts (``benchmark.root``):

* ``llava``: the TSV LLaVA's scripts read (``benchmark.tsv``, default ``mmbench_dev_20230712.tsv``,
  and ``mmbench_dev_cn_20231003.tsv`` for ``mmbench_cn``), columns ``index, question, hint, A-D,
  answer, category, l2-category, split, image`` (base64).
* ``lmms_lab``: ``en/dev-*.parquet`` or ``cn/dev-*.parquet`` (lmms-lab/MMBench).

The prompt is ``model_vqa_mmbench.py``'s: ``[hint + "\\n"] + question``, then ``"\\n<L>. <option>"``
for the options up to the first empty one, then the letter suffix (Chinese for ``mmbench_cn``).
The TSV holds each question and its circularly shifted copies (``index + k * 1e6``).

Scoring: the official server extracts a letter with rules and falls back to ChatGPT; offline,
vtclab applies the rules only (VLMEvalKit's, as in lmms-eval's ``MMBench_Evaluator``:
``can_infer_option`` then ``can_infer_text``) and counts unparsed answers wrong; ``unparsed`` says
how many there were. Both ``scorer_variant`` values use these rules (lmms-eval's default also
needs ChatGPT). Metrics: ``accuracy`` over rows, ``accuracy_circular`` (CircularEval: a question
counts only if it and all its shifted copies are right) overall and per category.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.base import DataRootError, Scorer
from benchmarks.data import Base64Image, Entry, Expected, ParquetImage, ParquetTable
from benchmarks.local import LETTER_ANSWER, LLAVA_EVAL_DOCS, LocalBenchmark
from benchmarks.registry import register_benchmark

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
CIRCULAR = 1_000_000
SUFFIX = {"en": LETTER_ANSWER, "cn": "\n请直接回答选项字母。"}
_WRAPPERS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
             (":", "."), (":", ")"), (":", ")."))


def is_none(value: Any) -> bool:
    """``model_vqa_mmbench.is_none``: None, NaN, "nan" or "none" (any case)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def _missing(value: Any) -> bool:
    """``pd.isna`` on a scalar: None or a float NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def infer_option(answer: str, choices: str = "ABCDE") -> str | None:
    """VLMEvalKit's ``can_infer_option``: exactly one choice letter as a word, or in one wrapper form."""
    if "Failed to obtain answer via API" in answer:
        return None
    words = [w.strip() for w in answer.split()]
    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in words for c in choices)
    if count() == 1:
        for letter in choices:
            if "A" in words and len(words) > 3:  # "A" may be an article ("A cat ...")
                break
            if letter in words:
                return letter
    for prefix, suffix in _WRAPPERS:
        if count(prefix, suffix) == 1:
            for letter in choices:
                if prefix + letter + suffix in words:
                    return letter
    return None


def infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: exactly one option's text occurs in the answer (case-insensitive)."""
    lowered = answer.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


class MMBenchScorer(Scorer):
    """Rule-based letter extraction, plain and circular accuracy (see the module doc)."""

    label: ClassVar[str] = "MMB"

    def score(self, prediction: str, reference: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
        parsed = infer_option(prediction) or infer_text(prediction, meta["choices"]) or ""
        return {"score": float(parsed == reference[0]) if reference else None, "parsed_prediction": parsed}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        scored = [r for r in records if r.get("score") is not None]
        if not scored:
            return {}
        metrics = {"accuracy": sum(r["score"] for r in scored) / len(scored) * 100,
                   "unparsed": sum(not r["parsed_prediction"] for r in scored) / len(scored) * 100}
        groups: dict[int, list[Mapping[str, Any]]] = {}
        for record in scored:
            groups.setdefault(int(record["meta"]["index"]) % CIRCULAR, []).append(record)
        hits = {main: float(all(r["score"] == 1.0 for r in rows)) for main, rows in groups.items()}
        metrics["accuracy_circular"] = sum(hits.values()) / len(hits) * 100
        by_category: dict[str, list[float]] = {}
        for main, rows in groups.items():
            first = min(rows, key=lambda r: int(r["meta"]["index"]))  # the unshifted question
            by_category.setdefault(str(first["meta"].get("category")), []).append(hits[main])
        for category in sorted(by_category):
            metrics[f"accuracy_circular/{category}"] = sum(by_category[category]) / len(by_category[category]) * 100
        return metrics

    def headline(self, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        if "accuracy_circular" not in metrics:
            return None
        return {"metric": "accuracy_circular", "label": self.label, "value": metrics["accuracy_circular"], "unit": "%"}


class MMBenchCNScorer(MMBenchScorer):
    label = "MMB-CN"


@register_benchmark("mmbench")
class MMBench(LocalBenchmark):
    """MMBench (English) dev; see the module doc for files, prompt and scoring."""

    language: ClassVar[str] = "en"
    sources = {
        "llava": f"{LLAVA_EVAL_DOCS}; the TSV from https://github.com/open-compass/MMBench "
                 "(mmbench_dev_20230712.tsv, mmbench_dev_cn_20231003.tsv)",
        "lmms_lab": "https://huggingface.co/datasets/lmms-lab/MMBench (en/dev-*.parquet, cn/dev-*.parquet)",
    }

    def __init__(self, root: str, layout: str = "llava", tsv: str = "mmbench_dev_20230712.tsv",
                 scorer_variant: str = "llava", limit: int | None = None, max_new_tokens: int = 1024) -> None:
        super().__init__(root=root, layout=layout, scorer_variant=scorer_variant, limit=limit,
                         max_new_tokens=max_new_tokens)
        if not isinstance(tsv, str) or not tsv.endswith(".tsv"):
            raise ValueError(f"benchmark.tsv must be a .tsv file name, got {tsv!r}")
        self.tsv = tsv

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> MMBenchScorer:
        return MMBenchScorer(variant)

    def _entry(self, row: Mapping[str, Any], image) -> Entry:
        index = row.get("index")
        if is_none(index) or is_none(row.get("question")):
            return Entry(id=f"row-{row.get('_row')}", error=f"row {row.get('_row')} lacks index or question")
        options = {}
        for letter in LETTERS:  # get_options: up to the first missing option
            if letter not in row or is_none(row[letter]):
                break
            options[letter] = str(row[letter])
        # build_choices (the scorer's text match): every option that is not NaN/None
        choices = {letter: str(row[letter]) for letter in LETTERS if letter in row and not _missing(row[letter])}
        question = str(row["question"])
        if not is_none(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        for letter, option in options.items():
            question += f"\n{letter}. {option}"
        answer = row.get("answer")
        return Entry(id=str(int(index)), question=question + SUFFIX[self.language],
                     answers=() if is_none(answer) else (str(answer),),
                     meta={"index": int(index), "options": options, "choices": choices,
                           "question": str(row["question"]),
                           "category": None if is_none(row.get("category")) else str(row["category"]),
                           "split": None if is_none(row.get("split")) else str(row["split"])},
                     image=image)

    def _read_llava(self) -> list[Entry]:
        import pandas as pd  # only this layout needs it (LLaVA reads the TSV with pandas too)

        self.root.require([Expected(self.tsv, f"MMBench {self.language} TSV (base64 images)")])
        try:
            frame = pd.read_table(self.root.file(self.tsv))
        except (OSError, ValueError) as error:
            raise DataRootError(f"{self.name}: cannot read {self.tsv}: {error}. Get it from: "
                                f"{self.sources['llava']}") from None
        entries = []
        for position, row in enumerate(frame.to_dict("records")):
            row["_row"] = position
            entries.append(self._entry(row, Base64Image(row.get("image"))))
        return entries

    def _read_lmms_lab(self) -> list[Entry]:
        pattern = f"{self.language}/dev-*.parquet"
        self.root.require([Expected(pattern, f"lmms-lab/MMBench {self.language} dev shards")])
        columns = ["index", "question", "hint", *LETTERS, "answer", "category", "split"]
        table = ParquetTable(self.root.glob(pattern), columns)
        return [self._entry({**{c: table.columns[c][row] for c in columns}, "_row": row}, ParquetImage(table, row))
                for row in range(len(table))]

    def write_submission(self, records: Sequence[Mapping[str, Any]], directory: Path) -> list[Path]:
        """The xlsx LLaVA's ``convert_mmbench_for_submission.py`` writes for the OpenCompass server:
        ``index, question, A-D, prediction, answer, split``."""
        import pandas as pd

        rows = []
        for record in records:
            if record.get("failed"):
                continue
            meta = record["meta"]
            options = meta.get("options", {})
            rows.append({"index": meta.get("index", record["id"]), "question": meta.get("question"),
                         **{letter: options.get(letter) for letter in LETTERS},
                         "prediction": record.get("prediction"),
                         "answer": (record.get("reference") or [None])[0], "split": meta.get("split")})
        path = directory / f"{self.name}_submission.xlsx"
        pd.DataFrame(rows, columns=["index", "question", *LETTERS, "prediction", "answer", "split"]).to_excel(
            path, index=False, engine="openpyxl")
        return [path]


@register_benchmark("mmbench_cn")
class MMBenchCN(MMBench):
    """MMBench-CN dev: the Chinese TSV and letter suffix."""

    language = "cn"

    def __init__(self, root: str, layout: str = "llava", tsv: str = "mmbench_dev_cn_20231003.tsv",
                 scorer_variant: str = "llava", limit: int | None = None, max_new_tokens: int = 1024) -> None:
        super().__init__(root=root, layout=layout, tsv=tsv, scorer_variant=scorer_variant, limit=limit,
                         max_new_tokens=max_new_tokens)

    @classmethod
    def build_scorer(cls, variant: str = "llava") -> MMBenchScorer:
        return MMBenchCNScorer(variant)
