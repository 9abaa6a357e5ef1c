"""Stage-2 text: one image, several question turns, loss on the answers.

The first turn is exactly what the pipeline feeds at inference (``format_prompt``, one ``<image>``
run of vanilla length); further turns follow LLaVA's ``conv_vicuna_v1`` ("... ASSISTANT: a</s>USER:
q ASSISTANT: a</s>"), as LLaVA's own instruction data packs several questions per image. Image
tokens are computed once per image, so every extra question costs only its ~25 text tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks.hires_detail import CATEGORIES, SHAPE_COLORS, Question
from benchmarks.synthetic import SHAPES, SHORT_ANSWER_SUFFIX
from models.pipeline import splice_image_tokens
from models.prompts import format_prompt
from models.training.model import FOLLOW_UP


@dataclass(frozen=True)
class Conversation:
    """Token ids and where the loss applies.

    Attributes:
        input_ids: ``[1, N]`` with ``image_tokens`` ``<image>`` placeholders.
        positions: ``[A]`` positions whose next-token logits are scored.
        targets: ``[A]`` the token each of those positions must predict (answers and ``</s>``).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    target_turns: torch.Tensor  # [A] the turn each target belongs to
    turn_positions: torch.Tensor  # [Q] the position that predicts each turn's answer (its first target)
    asked: torch.Tensor  # [Q, len(ASKED)] what each question names (``asked_labels``)


# What a question names, as the stage-2 auxiliary heads predict it: its type, the shape kind and the
# colour its text mentions (IGNORE where it mentions none). Read from the question's words only, so
# an answer never leaks into a label.
ASKED: dict[str, tuple[str, ...]] = {"category": CATEGORIES, "kind": SHAPES, "color": SHAPE_COLORS}
IGNORE = -100


def asked_labels(question: Question) -> list[int]:
    """``[category, kind, colour]`` indices for ``question`` (``IGNORE`` for a kind or colour it does not name)."""
    words = question.text.rstrip("?").lower().split()
    kind = next((i for i, k in enumerate(SHAPES) if k in words or f"{k}s" in words), IGNORE)
    color = next((i for i, c in enumerate(SHAPE_COLORS) if c in words), IGNORE)
    return [CATEGORIES.index(question.category), kind, color]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def build_conversation(tokenizer, questions: Sequence[Question], image_token_id: int, image_tokens: int,
                       prompt_format: str = "vicuna_v1") -> Conversation:
    """Token ids of a conversation about one image (``questions[0]`` is the inference-format turn)."""
    if not questions:
        raise ValueError("a conversation needs at least one question")
    ids = tokenizer(format_prompt(questions[0].text + SHORT_ANSWER_SUFFIX, prompt_format)).input_ids
    positions, targets, turn_positions, target_turns = [], [], [], []
    for turn, question in enumerate(questions):
        if turn:
            ids += _ids(tokenizer, FOLLOW_UP.format(question=question.text + SHORT_ANSWER_SUFFIX))
        answer = _ids(tokenizer, " " + question.answer) + [tokenizer.eos_token_id]
        turn_positions.append(len(ids) - 1)
        target_turns += [turn] * len(answer)
        positions += range(len(ids) - 1, len(ids) - 1 + len(answer))
        targets += answer
        ids += answer
    input_ids = torch.tensor([ids])
    placeholders = int((input_ids == image_token_id).sum())
    if placeholders != 1:
        raise ValueError(f"the first turn must hold one <image> token, found {placeholders}")
    # every scored position lies after the image, so the run of image_tokens shifts it by image_tokens - 1
    shift = image_tokens - 1
    return Conversation(input_ids=splice_image_tokens(input_ids, image_token_id, image_tokens),
                        positions=torch.tensor(positions) + shift, targets=torch.tensor(targets),
                        target_turns=torch.tensor(target_turns),
                        turn_positions=torch.tensor(turn_positions) + shift,
                        asked=torch.tensor([asked_labels(q) for q in questions]))


TURN_ORDER = ("color", "digit", "count", "presence")  # colour before presence: a "yes" never gives a colour away


def training_turns(rng, primary: Question, candidates: dict[str, list[Question]], max_turns: int) -> list[Question]:
    """``primary`` (the benchmark-format question) first, then up to ``max_turns - 1`` others.

    Every question type can follow; within a type the order is shuffled with ``rng``.
    """
    turns = [primary]
    for category in TURN_ORDER:
        others = [q for q in candidates.get(category, []) if q != primary]
        rng.shuffle(others)
        turns += others
    return turns[:max_turns]
