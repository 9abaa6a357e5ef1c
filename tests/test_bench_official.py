"""vtclab's scorers equal the official scripts' outputs exactly, on a few hundred random predictions
with corner cases (``tests/data/bench_official_reference.json``; see ``tests/data/README.md`` for the
scripts, their commits, and how the file was made)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gqa import GQAScorer
from benchmarks.mmbench import MMBenchScorer
from benchmarks.mme import MMEScorer
from benchmarks.pope import POPEScorer
from benchmarks.scienceqa import ScienceQAScorer
from benchmarks.seed_bench import IMAGE_TYPES, SEEDScorer
from benchmarks.textvqa import TextVQAScorer, prompt_question
from benchmarks.vqa_accuracy import evalai_normalize
from benchmarks.vqav2 import VizWizScorer, VQAScorer

REFERENCE = json.loads((Path(__file__).parent / "data" / "bench_official_reference.json").read_text(encoding="utf-8"))


def scored(scorer, samples, reference, meta=lambda s: {}):
    """Records as the runner stores them: score fields + reference + meta."""
    out = []
    for s in samples:
        ref = reference(s)
        out.append({**scorer.score(s["prediction"], ref, meta(s)), "reference": ref, "meta": meta(s)})
    return out


def test_reference_file_covers_every_scorer_with_every_corner_case():
    corner = REFERENCE["corner_cases"]
    for case in ("", "A.", "Yes, there is a dog.", "NO", "Nope", "two", "the cat", "1,000", "3.5.", "a." * 40):
        assert case in corner
    for name in ("textvqa", "vqa", "mme", "pope", "gqa", "scienceqa", "seed_bench", "mmbench"):
        predictions = {s["prediction"] for s in REFERENCE[name]["samples"]}
        # MME's official format is one answer per tab-separated line: no tabs or newlines there
        assert {c for c in corner if name != "mme" or not {"\t", "\n"} & set(c)} <= predictions, name
        assert len(REFERENCE[name]["samples"]) >= 200


@pytest.mark.parametrize("variant", ["llava", "lmms_eval"])
def test_textvqa_equals_m4c_evaluator_and_lmms_eval(variant):
    ref = REFERENCE["textvqa"]
    scorer = TextVQAScorer(variant)
    records = scored(scorer, ref["samples"], lambda s: s["answers"])
    key = "official_score" if variant == "llava" else "lmms_eval_score"
    assert [r["score"] for r in records] == [s[key] for s in ref["samples"]]
    assert [r["parsed_prediction"] for r in records] == [s["official_normalized"] for s in ref["samples"]]
    total = 100.0 * ref["official_accuracy"] if variant == "llava" else 100 * ref["lmms_eval_mean"]
    assert scorer.aggregate(records)["accuracy"] == total
    for prompt, question in ref["prompt_processor"]:
        assert prompt_question(prompt) == question


def test_evalai_normalize_equals_llava_submission_converters():
    ref = REFERENCE["evalai_normalize"]
    answers = [evalai_normalize(t) for t in ref["texts"]]
    assert answers == [row["answer"] for row in ref["vizwiz_submission"]]
    assert answers == [row["answer"] for row in ref["vqav2_submission"][: len(answers)]]
    assert [row["answer"] for row in ref["vqav2_submission"][len(answers):]] == ["", ""]  # padded, not run


@pytest.mark.parametrize("scorer_class", [VQAScorer, VizWizScorer])
@pytest.mark.parametrize("variant", ["llava", "lmms_eval"])
def test_vqa_accuracy_equals_official_vqa_eval_and_lmms_eval(scorer_class, variant):
    ref = REFERENCE["vqa"]
    scorer = scorer_class(variant)
    records = scored(scorer, ref["samples"], lambda s: s["answers"])
    assert [r["parsed_prediction"] for r in records] == [s["submitted"] for s in ref["samples"]]
    key = ("official_score" if variant == "llava" else
           "lmms_eval_vqav2" if scorer_class is VQAScorer else "lmms_eval_vizwiz")
    assert [r["score"] for r in records] == [s[key] for s in ref["samples"]]
    if variant == "llava":
        accuracy = scorer.aggregate(records)["accuracy"]
        assert accuracy == ref["official_overall_unrounded"] and round(accuracy, 2) == ref["official_overall_rounded"]


@pytest.mark.parametrize("variant", ["llava", "lmms_eval"])
def test_mme_equals_calculation_py_and_lmms_eval(variant):
    ref = REFERENCE["mme"]
    scorer = MMEScorer(variant)
    records = scored(scorer, ref["samples"], lambda s: [s["answer"]],
                     lambda s: {"category": s["subtask"], "image": s["image"]})
    metrics = scorer.aggregate(records)
    if variant == "llava":
        assert {k: metrics[k] for k in ref["official"]} == ref["official"]
        assert set(ref["official"]) == {"perception", "cognition", *(f"score/{t}" for t in
                                                                   {s["subtask"] for s in ref["samples"]})}
    else:
        assert [r["score"] for r in records] == [s["lmms_eval_score"] for s in ref["samples"]]
        assert (metrics["perception"], metrics["cognition"]) == (ref["lmms_eval"]["perception"],
                                                                 ref["lmms_eval"]["cognition"])


@pytest.mark.parametrize("variant", ["llava", "lmms_eval"])
def test_pope_equals_eval_pope_and_lmms_eval(variant):
    ref = REFERENCE["pope"]
    scorer = POPEScorer(variant)
    records = scored(scorer, ref["samples"], lambda s: [s["label"]], lambda s: {"category": s["split"]})
    metrics = scorer.aggregate(records)
    expected = ref["official"] if variant == "llava" else ref["lmms_eval"]
    assert len(expected) == 15
    assert {k: metrics[k] for k in expected} == {k: v * 100 for k, v in expected.items()}
    splits = ("adversarial", "popular", "random")  # what LLaVA-NeXT papers print: the mean over the splits
    assert metrics["f1"] == sum(expected[f"f1/{s}"] for s in splits) / 3 * 100
    assert metrics["accuracy"] == sum(expected[f"accuracy/{s}"] for s in splits) / 3 * 100
    if variant == "lmms_eval":
        assert [r["score"] for r in records] == [s["lmms_eval_score"] for s in ref["samples"]]


@pytest.mark.parametrize("variant", ["llava", "lmms_eval"])
def test_gqa_equals_official_eval_and_lmms_eval(variant):
    ref = REFERENCE["gqa"]
    scorer = GQAScorer(variant)
    records = scored(scorer, ref["samples"], lambda s: [s["answer"]],
                     lambda s: {"answer_type": "open" if s["structural"] == "query" else "binary"})
    metrics = scorer.aggregate(records)
    if variant == "llava":
        assert [r["parsed_prediction"] for r in records] == [s["official_converted"] for s in ref["samples"]]
        assert {k: metrics[k] for k in ("accuracy", "binary", "open")} == ref["official"]
    else:
        assert [r["score"] for r in records] == [s["lmms_eval_score"] for s in ref["samples"]]
        assert metrics["accuracy"] == ref["lmms_eval_mean"] * 100


@pytest.mark.parametrize("variant", ["llava", "lmms_eval"])
def test_scienceqa_equals_eval_science_qa_and_lmms_eval(variant):
    ref = REFERENCE["scienceqa"]
    scorer = ScienceQAScorer(variant)
    records = scored(scorer, ref["samples"], lambda s: [s["answer"]], lambda s: {"num_choices": s["num_choices"]})
    images = [r for r, s in zip(records, ref["samples"]) if s["image"]]
    if variant == "llava":
        assert [r["parsed_prediction"] for r in records] == [s["official_parsed"] for s in ref["samples"]]
        assert [r["score"] == 1.0 for r in records] == [s["official_correct"] for s in ref["samples"]]
        assert scorer.aggregate(images)["img_accuracy"] == ref["official_img_accuracy"]
    else:
        assert [r["score"] for r in records] == [s["lmms_eval_score"] for s in ref["samples"]]
        assert scorer.aggregate(images)["img_accuracy"] == ref["lmms_eval_img_mean"] * 100


@pytest.mark.parametrize("variant", ["llava", "lmms_eval"])
def test_seed_bench_equals_convert_seed_for_submission_and_lmms_eval(variant):
    ref = REFERENCE["seed_bench"]
    scorer = SEEDScorer(variant)
    records = scored(scorer, ref["samples"], lambda s: [s["answer"]], lambda s: {"question_type_id": s["type"]})
    metrics = scorer.aggregate(records)
    if variant == "llava":
        assert metrics["accuracy"] == ref["official_image_accuracy"]
        assert {f"accuracy/{IMAGE_TYPES[int(k)]}": v for k, v in ref["official_per_type"].items()} == {
            k: v for k, v in metrics.items() if k.startswith("accuracy/")}
    else:
        assert [r["score"] == 1.0 for r in records] == [s["lmms_eval_correct"] for s in ref["samples"]]
        assert metrics["accuracy"] == ref["lmms_eval_image"] * 100


def test_mmbench_equals_vlmevalkit_rules_and_circular_eval():
    ref = REFERENCE["mmbench"]
    scorer = MMBenchScorer()
    records = scored(scorer, ref["samples"], lambda s: [s["answer"]],
                     lambda s: {"choices": s["choices"], "index": s["index"], "category": s["category"]})
    assert [r["parsed_prediction"] for r in records] == [s["official_parsed"] for s in ref["samples"]]
    metrics = scorer.aggregate(records)
    assert metrics["accuracy_circular"] == ref["official_circular"] * 100
    assert {k: metrics[f"accuracy_circular/{k}"] for k in ref["official_circular_per_category"]} == {
        k: v * 100 for k, v in ref["official_circular_per_category"].items()}
