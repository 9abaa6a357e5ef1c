"""VQA-style soft accuracy and the answer normalisers of the official tools, quirks included.

Three tools score open answers against 10 human answers, with small differences that move scores:

* **EvalAI / m4c** (``llava/eval/m4c_evaluator.py``; lmms-eval's ``vqa_eval_metric.py`` is the same
  code): ``evalai_normalize`` lower-cases, deletes ``,`` and ``?``, splits ``'s``, then runs the
  punctuation and digit/article steps on *every* answer. LLaVA's TextVQA score and its VQAv2 /
  VizWiz submission files use it.
* **The official VQA evaluation** (``GT-Vision-Lab/VQA@a013f00``, ``vqaEval.py``), which EvalAI
  runs on the submitted answers: no tokenising step, and answers and prediction are normalised
  *only when the 10 answers are not all identical*.
* **lmms-eval's VQAv2** scorer: punctuation + digit/article steps on everything, always.

Quirks shared by all of them, kept on purpose:

* The period rule ``(?!<=\\d)(\\.)(?!\\d)`` has a malformed look-behind, so it deletes every ``.``
  not followed by a digit; it is called as ``sub("", s, re.UNICODE)``, i.e. ``count=32``: at most 32
  periods go.
* A punctuation mark is *deleted* when it touches a space anywhere in the input (or the input has
  a digit-comma-digit), otherwise *replaced by a space*.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                                "@", "`", ",", "?", "!")
PERIOD = re.compile(r"\.(?!\d)")  # the official pattern's look-behind never applies (see module doc)
PERIOD_MAX_REMOVALS = int(re.UNICODE)  # the official call passes re.UNICODE (32) as ``count``
COMMA_IN_NUMBER_M4C = re.compile(r"(?<=\d),+(?=\d)")
COMMA_IN_NUMBER_VQA = re.compile(r"\d,\d")
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# Contractions, "<written form> <- <forms mapped to it>"; the table of both m4c and the official
# evaluation (identical at the commits read). Two entries map a word to itself, as there.
_CONTRACTION_TABLE = """
'ow's'at <- 'ow'sat 'ows'at ow's'at | 'twas <- twas | I'd've <- I'dve Id've | I'm <- Im | I've <- Ive
ain't <- aint | aren't <- arent | can't <- cant | could've <- couldve | couldn't <- couldnt
couldn't've <- couldn'tve couldnt've | didn't <- didnt | doesn't <- doesnt | don't <- dont | hadn't <- hadnt
hadn't've <- hadn'tve hadnt've | hasn't <- hasnt | haven't <- havent | he'd <- hed | he'd've <- he'dve hed've
he's <- hes | how'd <- howd | how'll <- howll | how's <- hows | isn't <- isnt | it'd <- itd
it'd've <- it'dve itd've | it'll <- itll | let's <- let's | ma'am <- maam | might've <- mightve
mightn't <- mightnt | mightn't've <- mightn'tve mightnt've | must've <- mustve | mustn't <- mustnt
needn't <- neednt | not've <- notve | o'clock <- oclock | oughtn't <- oughtnt | shan't <- shant
she'd've <- she'dve shed've | she's <- she's | should've <- shouldve | shouldn't <- shouldnt
shouldn't've <- shouldn'tve shouldnt've | somebody'd've <- somebody'dve somebodyd've | somebody'll <- somebodyll
somebody's <- somebodys | somebodyd <- somebody'd | someone'd <- someoned | someone'd've <- someone'dve someoned've
someone'll <- someonell | someone's <- someones | something'd <- somethingd
something'd've <- something'dve somethingd've | something'll <- somethingll | that's <- thats | there'd <- thered
there'd've <- there'dve thered've | there're <- therere | there's <- theres | they'd <- theyd
they'd've <- they'dve theyd've | they'll <- theyll | they're <- theyre | they've <- theyve | wasn't <- wasnt
we'd've <- we'dve wed've | we've <- weve | weren't <- werent | what'll <- whatll | what're <- whatre
what's <- whats | what've <- whatve | when's <- whens | where'd <- whered | where's <- wheres
where've <- whereve | who'd <- whod | who'd've <- who'dve whod've | who'll <- wholl | who's <- whos
who've <- whove | why'll <- whyll | why're <- whyre | why's <- whys | won't <- wont | would've <- wouldve
wouldn't <- wouldnt | wouldn't've <- wouldn'tve wouldnt've | y'all <- yall
y'all'd've <- y'all'dve y'alld've yall'd've | y'all'll <- y'allll yall'll | you'd <- youd
you'd've <- you'dve youd've | you'll <- youll | you're <- youre | you've <- youve
"""


def _parse_contractions(table: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in table.replace("\n", " | ").split("|"):
        if item.strip():
            target, sources = item.split("<-")
            mapping.update({source: target.strip() for source in sources.split()})
    return mapping


CONTRACTIONS = _parse_contractions(_CONTRACTION_TABLE)


def process_punctuation(text: str, comma_in_number: re.Pattern = COMMA_IN_NUMBER_M4C) -> str:
    """Delete or blank each punctuation mark (decided on the *input*), then strip periods."""
    delete_all = comma_in_number.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=PERIOD_MAX_REMOVALS)


def process_digit_article(text: str) -> str:
    """Lower-case, number words to digits, drop articles, restore contractions, single spaces."""
    words = [NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def evalai_normalize(answer: str) -> str:
    """``EvalAIAnswerProcessor.__call__`` of m4c / lmms-eval (LLaVA's TextVQA and submission files)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _leave_one_out(answers: Sequence[str], prediction: str) -> list[float]:
    """For each answer i: min(1, #{j != i : answer_j == prediction} / 3)."""
    matches = sum(a == prediction for a in answers)
    return [min(1, (matches - (a == prediction)) / 3) for a in answers]


def m4c_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction as ``TextVQAAccuracyEvaluator`` (exactly 10 answers).

    Every answer and the prediction go through ``evalai_normalize``; a prediction matching none of
    the answers scores 0, otherwise the mean over the 10 leave-one-out terms (summed in order).
    """
    if len(answers) != 10:
        raise ValueError(f"TextVQA's m4c evaluator needs exactly 10 answers, got {len(answers)}")
    normalized = [evalai_normalize(a) for a in answers]
    predicted = evalai_normalize(prediction)
    if predicted not in normalized:
        return 0.0
    terms = _leave_one_out(normalized, predicted)
    return sum(terms) / len(terms)


def lmms_eval_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """lmms-eval's TextVQA / VizWiz rule: ``evalai_normalize`` everything, ``statistics.mean`` of the
    leave-one-out terms (0 when there are no answers)."""
    if not answers:
        return 0.0
    normalized = [evalai_normalize(a) for a in answers]
    return statistics.mean(_leave_one_out(normalized, evalai_normalize(prediction)))


def official_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy as the official ``VQAEval.evaluate`` (``GT-Vision-Lab/VQA@a013f00``).

    ``prediction`` is the answer as submitted (LLaVA submits ``evalai_normalize(text)``). Newlines and
    tabs become spaces; punctuation and digit/article steps run on answers and prediction only when
    the answers are not all identical; leave-one-out over the answers' positions.
    """
    if not answers:
        raise ValueError("the official VQA accuracy needs reference answers")
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    predicted = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a, COMMA_IN_NUMBER_VQA)) for a in gts]
        predicted = process_digit_article(process_punctuation(predicted, COMMA_IN_NUMBER_VQA))
    terms = _leave_one_out(gts, predicted)
    return float(sum(terms)) / len(terms)


def lmms_eval_vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """lmms-eval's ``vqav2_process_results``: whitespace clean-up, then punctuation and digit/article
    steps on answers and prediction always, ``statistics.mean`` of the leave-one-out terms."""
    if not answers:
        raise ValueError("VQA accuracy needs reference answers")
    def clean(text: str) -> str:
        return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))
    return statistics.mean(_leave_one_out([clean(a) for a in answers], clean(prediction)))
