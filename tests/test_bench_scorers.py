"""Hand-computed cases for every scorer quirk, from the official scripts' documented definitions
(``../shared/notes/framework_anchors.md`` section 1.2); the scripts' own outputs are compared in
``test_bench_official.py``."""

from __future__ import annotations

import pytest

from benchmarks.base import SCORER_VARIANTS
from benchmarks.gqa import GQAScorer
from benchmarks.mmbench import MMBenchCNScorer, MMBenchScorer, infer_option, infer_text
from benchmarks.mme import MMEScorer, parse_lmms_eval, parse_official
from benchmarks.pope import POPEScorer
from benchmarks.pope import parse_official as pope_parse
from benchmarks.registry import get_benchmark_class
from benchmarks.scienceqa import ScienceQAScorer
from benchmarks.scienceqa import parse_official as sqa_parse
from benchmarks.seed_bench import SEEDScorer
from benchmarks.textvqa import TextVQAScorer, prompt_question, without_ocr_line
from benchmarks.vqa_accuracy import (
    evalai_normalize,
    lmms_eval_vqav2_accuracy,
    m4c_soft_score,
    official_vqa_accuracy,
    process_punctuation,
)
from benchmarks.vqav2 import VizWizScorer, VQAScorer

# ---------------------------------------------------------------------------------------------
# EvalAI / m4c normaliser and VQA accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "normalized"), [
    ("Yes.", "yes"),                     # lower-case, period removed
    ("3.5.", "3.5"),                     # a period before a digit stays
    ("The two cats", "2 cats"),          # articles dropped, number words to digits
    ("none", "0"),
    ("1,000 people", "1000 people"),     # commas deleted by the tokenising step
    ("hello? world", "hello world"),     # '?' deleted by the tokenising step
    ("e-mail", "e mail"),                # '-' touches no space: replaced by a space
    ("e - mail", "e mail"),              # ' -' in the input: deleted
    ("(green)", "green"),                # replaced by spaces, then whitespace collapsed
    ("dont", "don't"),                   # contractions restored
    ("mother's", "mother 's"),           # "'s" split off
    ("", ""),
    ("U.S.A.", "usa"),
])
def test_evalai_normalize_hand_cases(raw, normalized):
    assert evalai_normalize(raw) == normalized


def test_period_rule_removes_at_most_32_periods():
    """``PERIOD_STRIP.sub("", s, re.UNICODE)``: re.UNICODE (32) is the count."""
    assert evalai_normalize("a." * 40) == "a" * 32 + "a." * 8
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8


def test_punctuation_is_deleted_everywhere_once_any_instance_touches_a_space():
    assert process_punctuation("a-b - c") == "ab  c"
    assert process_punctuation("a-b-c") == "a b c"


def test_m4c_soft_score_hand_computed():
    answers = ["cph", "cph"] + ["copenhagen"] * 8
    # the 2 "cph" positions see 1 other "cph" (1/3), the 8 others see 2 (2/3): (2/3 + 16/3) / 10
    assert m4c_soft_score("CPH.", answers) == pytest.approx(0.6, abs=1e-15)
    assert m4c_soft_score("copenhagen", answers) == 1.0
    assert m4c_soft_score("paris", answers) == 0.0
    with pytest.raises(ValueError, match="exactly 10 answers"):
        m4c_soft_score("x", ["a"] * 9)


def test_official_vqa_normalises_only_when_answers_disagree():
    assert official_vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # identical answers: nothing normalised
    assert official_vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert official_vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0  # normalised: 8 or 9 other matches
    # "no": the 9 "yes" positions see 1 other "no" (1/3), the "no" position sees none: 9/30
    assert official_vqa_accuracy("no", ["yes"] * 9 + ["no"]) == pytest.approx(0.3, abs=1e-15)
    assert lmms_eval_vqav2_accuracy("Yes", ["yes"] * 10) == 1  # lmms-eval always normalises


# ---------------------------------------------------------------------------------------------
# TextVQA
# ---------------------------------------------------------------------------------------------


def test_textvqa_prompt_processor_and_ocr_line():
    prompt = "What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase."
    assert prompt_question(prompt) == "what is it?"
    assert prompt_question("Reference OCR token: A\nWhat Is It?\nAnswer.") == "what is it?"
    assert without_ocr_line(prompt) == "What is it?\nAnswer the question using a single word or phrase."
    with pytest.raises(Exception, match="unrecognised"):
        prompt_question("one\ntwo\nthree\nfour")  # LLaVA's evaluator asserts on it


def test_textvqa_scorer_records_normalized_prediction():
    fields = TextVQAScorer().score("Dakota Digital.", ["dakota digital"] * 10, {})
    assert fields == {"score": 1.0, "parsed_prediction": "dakota digital"}


# ---------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prediction", "official", "lmms_eval"), [
    ("Yes", "yes", "yes"), ("Yes, it is.", "yes", "yes"), ("No.", "no", "no"), ("Nope", "no", "no"),
    ("not sure", "no", "no"),            # "no" inside the first 4 characters
    ("snow", "no", "no"),
    ("I think yes", "other", "other"),   # only the first 4 characters are looked at
    ("A yes.", "other", "other"),
    ("y", "other", "yes"), ("n", "other", "no"),  # lmms-eval accepts a lone y / n
    ("", "other", "other"), ("YES.", "yes", "yes"),
])
def test_mme_parsers(prediction, official, lmms_eval):
    assert parse_official(prediction) == official
    assert parse_lmms_eval(prediction) == lmms_eval


def test_mme_acc_plus_and_points_by_hand():
    scorer = MMEScorer()
    rows = [("count", "count/1.jpg", "Yes", "yes"), ("count", "count/1.jpg", "No", "no"),
            ("count", "count/2.jpg", "Yes", "yes"), ("count", "count/2.jpg", "No", "yes"),
            ("code_reasoning", "code_reasoning/1.png", "Yes", "maybe"),
            ("code_reasoning", "code_reasoning/1.png", "No", "no")]
    # interleaved on purpose: images are grouped by key, not by adjacent lines
    order = [0, 2, 1, 3, 4, 5]
    records = [{**scorer.score(p, [g], {}), "meta": {"category": c, "image": i}} for c, i, g, p in
               (rows[k] for k in order)]
    metrics = scorer.aggregate(records)
    assert metrics["score/count"] == 75.0 + 50.0  # acc 3/4, acc+ 1/2
    assert metrics["score/code_reasoning"] == 50.0 + 0.0
    assert (metrics["perception"], metrics["cognition"]) == (125.0, 50.0)
    assert scorer.headline(metrics) == {"metric": "perception", "label": "MME-P", "value": 125.0, "unit": "points"}


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prediction", "parsed"), [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("NO", "yes"), ("Nope", "yes"), ("", "yes"),
    ("No, it is not.", "no"), ("There is no dog. Yes.", "no"), ("Yes. There is no dog.", "yes"), ("not.", "no"),
])
def test_pope_official_yes_no_rule(prediction, parsed):
    assert pope_parse(prediction) == parsed


def test_pope_metrics_by_hand_and_the_lmms_eval_yes_ratio_bug():
    labels = ["yes", "yes", "no", "no", "yes"]
    predictions = ["Yes", "No", "Yes", "No", "Yes."]
    for variant in SCORER_VARIANTS:
        scorer = POPEScorer(variant)
        records = [{**scorer.score(p, [g], {}), "reference": [g], "meta": {"category": "random"}}
                   for p, g in zip(predictions, labels)]
        m = scorer.aggregate(records)
        if variant == "llava":  # TP 2 (Yes, Yes.), FN 1, FP 1, TN 1
            assert (m["precision/random"], m["recall/random"]) == pytest.approx((200 / 3, 200 / 3))
            assert m["accuracy/random"] == 60.0
            assert m["yes_ratio/random"] == 60.0 and m["questions/random"] == 5
            assert m["f1"] == m["f1/random"] == pytest.approx(200 / 3)
        else:  # "Yes." is neither yes nor no: TP 1, FN 1, FP 1; yes-ratio counts ground truth (3/5)
            assert (m["precision/random"], m["recall/random"]) == (50.0, 50.0)
            assert m["accuracy/random"] == 40.0 and m["yes_ratio/random"] == 60.0


def test_pope_split_without_yes_predictions_has_no_precision():
    scorer = POPEScorer()
    records = [{**scorer.score("No", [g], {}), "reference": [g], "meta": {"category": "adversarial"}}
               for g in ("yes", "no")]
    metrics = scorer.aggregate(records)
    assert metrics["precision/adversarial"] is None and metrics["f1/adversarial"] is None
    assert "f1" not in metrics and scorer.headline(metrics) is None


# ---------------------------------------------------------------------------------------------
# GQA, ScienceQA, SEED
# ---------------------------------------------------------------------------------------------


def test_gqa_variants():
    llava, lmms = GQAScorer("llava"), GQAScorer("lmms_eval")
    assert llava.score("Red..", ["red"], {}) == {"score": 1.0, "parsed_prediction": "red"}
    assert llava.score("red!", ["red"], {})["score"] == 0.0  # only trailing periods go
    assert lmms.score("Red!", ["red"], {})["score"] == 1.0   # every punctuation character goes
    assert lmms.score("T-Shirt", ["t-shirt"], {})["score"] == 1.0
    assert lmms.score(" red", ["red"], {})["score"] == 0.0  # whitespace is not punctuation
    records = [{"score": s, "meta": {"answer_type": t}} for s, t in ((1.0, "open"), (0.0, "open"), (1.0, "binary"))]
    assert llava.aggregate(records) == pytest.approx({"accuracy": 200 / 3, "binary": 100.0, "open": 50.0})


@pytest.mark.parametrize(("prediction", "parsed"), [
    ("A", "A"), ("A.", "FAILED"), ("A. cat", "A"), ("The answer is B.", "B"), ("The answer is B", "FAILED"),
    ("The answer is B. The answer is C.", "FAILED"), ("b", "FAILED"), ("", "FAILED"), ("F", "FAILED"),
])
def test_scienceqa_official_letter_parser(prediction, parsed):
    assert sqa_parse(prediction) == parsed


def test_scienceqa_variants_and_choice_range():
    llava, lmms = ScienceQAScorer("llava"), ScienceQAScorer("lmms_eval")
    assert llava.score("A.", ["A"], {"num_choices": 2})["score"] == 0.0
    assert lmms.score("A.", ["A"], {"num_choices": 2})["score"] == 1.0  # lmms-eval accepts "A."
    assert lmms.score("a", ["A"], {"num_choices": 2})["score"] == 1.0
    assert llava.score("The answer is C.", ["C"], {"num_choices": 2})["score"] == 0.0  # outside the choices
    records = [{"score": s} for s in (1.0, 0.0, 0.0, 1.0)]
    assert llava.aggregate(records) == {"img_accuracy": 50.0}


def test_seed_variants():
    llava, lmms = SEEDScorer("llava"), SEEDScorer("lmms_eval")
    assert llava.score("A.", ["A"], {})["score"] == 0.0  # exact equality, no normalisation
    assert lmms.score("A.", ["A"], {})["score"] == 1.0 and lmms.score(" a ", ["A"], {})["score"] == 1.0
    records = [{"score": s, "meta": {"question_type_id": t}} for s, t in ((1.0, 1), (0.0, 1), (1.0, 5))]
    assert llava.aggregate(records) == pytest.approx({"accuracy": 200 / 3, "accuracy/Scene Understanding": 50.0,
                                                      "accuracy/Instances Counting": 100.0})


# ---------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------


def test_mmbench_rule_based_letter_extraction():
    assert infer_option("B") == "B" and infer_option("(C).") == "C" and infer_option("B.") == "B"
    assert infer_option("A cat sits on the mat") is None  # "A" with > 3 words may be an article
    assert infer_option("A B") is None  # two letters
    assert infer_option("E") == "E"
    assert infer_text("I see a dog", {"A": "cat", "B": "dog"}) == "B"
    assert infer_text("cats and dogs", {"A": "cat", "B": "dog"}) is None


def test_mmbench_circular_eval_by_hand():
    scorer = MMBenchScorer()
    choices = {"A": "cat", "B": "dog"}
    rows = [(0, "A", "A"), (1_000_000, "B", "B"),   # question 0: both rounds right -> hit
            (1, "A", "A"), (1_000_001, "B", "A"),   # question 1: second round wrong -> miss
            (2, "B", "nothing")]                     # question 2: unparsed -> wrong
    records = [{**scorer.score(p, [g], {"choices": choices}), "meta": {"index": i, "category": "c"}}
               for i, g, p in rows]
    metrics = scorer.aggregate(records)
    assert metrics["accuracy"] == 60.0 and metrics["unparsed"] == 20.0
    assert metrics["accuracy_circular"] == metrics["accuracy_circular/c"] == pytest.approx(100 / 3)
    assert MMBenchCNScorer().headline(metrics)["label"] == "MMB-CN"


# ---------------------------------------------------------------------------------------------
# Unlabelled splits, variants, headlines
# ---------------------------------------------------------------------------------------------


def test_test_splits_have_no_local_score():
    for scorer in (VQAScorer(), VizWizScorer()):
        fields = scorer.score("Two dogs.", (), {})
        assert fields == {"score": None, "parsed_prediction": "2 dogs"}
        metrics = scorer.aggregate([{**fields}])
        assert metrics == {"answered": 0} and scorer.headline(metrics) is None


@pytest.mark.parametrize("name", ["gqa", "mmbench", "mmbench_cn", "mme", "pope", "scienceqa_img", "vqav2", "textvqa",
                                  "vizwiz", "seed_bench"])
def test_every_benchmark_builds_both_variants_and_rejects_others(name):
    cls = get_benchmark_class(name)
    assert {cls.build_scorer(v).variant for v in SCORER_VARIANTS} == set(SCORER_VARIANTS)
    with pytest.raises(ValueError, match=r"scorer_variant must be one of llava, lmms_eval, got 'official'"):
        cls.build_scorer("official")
