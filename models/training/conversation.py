"""Stage-2 text: one image, several question turns, loss on the answers.

The first turn is exactly what the pipeline feeds at inference (``format_prompt``, one ``<image>``
run of vanilla length); further turns follow LLaVA's ``conv_vicuna_v1`` ("... ASSISTANT: a</s>USER:
q ASSISTANT: a</s>"), as LLaVA's own instruction data packs several questions per image. Image
tokens are computed once per image, so every extra question costs only its ~25 text tokens.

Such turns can give answers away: a colour question is asked only about a shape that occurs once,
so a count turn after it reads "1" off the conversation, and the decoder learned that shortcut
instead of counting (47 of 48 such turns right, 1 of 30 single-turn count questions whose answer
was 1). With ``independent`` turns every question is its own inference prompt, sharing only the
system prompt and the image with the others (``Conversation.attention``): what inference asks.
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
    # Independent turns (``build_conversation(independent=True)``), else None: the turn each token belongs
    # to ``[N]``, how many leading tokens each turn sees besides its own ``[Q]`` (0 for turn 0, which is
    # the sequence's start), and each token's position id ``[N]``.
    token_turns: torch.Tensor | None = None
    turn_prefix: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def attention(self, index: torch.Tensor) -> torch.Tensor:
        """``[n, n]`` bool, who attends to whom among the tokens at sequence ``index`` ``[n]`` (ascending):
        causal, and for independent turns a later turn sees only its shared prefix and itself."""
        causal = index[None, :] <= index[:, None]  # [n, n]
        if self.token_turns is None:
            return causal
        turn = self.token_turns.to(index.device)[index]  # [n]
        shared = index[None, :] < self.turn_prefix.to(index.device)[turn][:, None]  # [n, n]
        return causal & ((turn[None, :] == turn[:, None]) | shared)


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


def _answer_ids(tokenizer, question: Question) -> list[int]:
    """What the assistant says: the answer word(s), then ``</s>``."""
    return _ids(tokenizer, " " + question.answer) + [tokenizer.eos_token_id]


def build_conversation(tokenizer, questions: Sequence[Question], image_token_id: int, image_tokens: int,
                       prompt_format: str = "vicuna_v1", independent: bool = False) -> Conversation:
    """Token ids of a conversation about one image (``questions[0]`` is the inference-format turn).

    With ``independent``, every turn is the inference prompt of its own question: turn ``t`` holds the
    tokens where its prompt departs from turn 0's, sees turn 0's tokens up to there (system, image,
    and any words the two questions start with) and itself, at the position ids its prompt has alone
    (``Conversation.attention``). One image forward then scores several single-turn questions, and no
    answer can be read off another turn.
    """
    if not questions:
        raise ValueError("a conversation needs at least one question")
    if independent:
        return _independent_conversation(tokenizer, questions, image_token_id, image_tokens, prompt_format)
    ids = tokenizer(format_prompt(questions[0].text + SHORT_ANSWER_SUFFIX, prompt_format)).input_ids
    positions, targets, turn_positions, target_turns = [], [], [], []
    for turn, question in enumerate(questions):
        if turn:
            ids += _ids(tokenizer, FOLLOW_UP.format(question=question.text + SHORT_ANSWER_SUFFIX))
        answer = _answer_ids(tokenizer, question)
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


def _independent_conversation(tokenizer, questions: Sequence[Question], image_token_id: int, image_tokens: int,
                              prompt_format: str) -> Conversation:
    prompts = [tokenizer(format_prompt(q.text + SHORT_ANSWER_SUFFIX, prompt_format)).input_ids for q in questions]
    first = prompts[0]
    image_at = first.index(image_token_id)
    ids, turns, positions, prefixes = [], [], [], []
    scored, targets, target_turns, turn_positions = [], [], [], []
    for turn, (question, prompt) in enumerate(zip(questions, prompts)):
        shared = 0
        if turn:
            limit = min(len(prompt), len(first)) - 1  # a turn keeps at least its last prompt token
            while shared < limit and prompt[shared] == first[shared]:
                shared += 1
            if shared <= image_at:
                raise ValueError(f"turn {turn}'s prompt departs from the first before the image")
        own = prompt[shared:] + _answer_ids(tokenizer, question)
        answer_len = len(own) - (len(prompt) - shared)
        start = len(ids)
        turn_positions.append(start + len(prompt) - shared - 1)
        scored += range(turn_positions[-1], turn_positions[-1] + answer_len)
        targets += own[len(prompt) - shared:]
        target_turns += [turn] * answer_len
        ids += own
        turns += [turn] * len(own)
        positions += range(shared, shared + len(own))
        prefixes.append(shared)
    shift = image_tokens - 1  # every position after the image moves by the run's length - 1
    turns_t, positions_t = torch.tensor(turns), torch.tensor(positions)
    positions_t = positions_t + shift * (positions_t > image_at)
    expand = torch.ones(len(ids), dtype=torch.long)
    expand[image_at] = image_tokens
    image_positions = torch.arange(image_at, image_at + image_tokens)
    positions_t = torch.cat([positions_t[:image_at], image_positions, positions_t[image_at + 1:]])
    turns_t = torch.repeat_interleave(turns_t, expand)
    return Conversation(input_ids=splice_image_tokens(torch.tensor([ids]), image_token_id, image_tokens),
                        positions=torch.tensor(scored) + shift, targets=torch.tensor(targets),
                        target_turns=torch.tensor(target_turns), turn_positions=torch.tensor(turn_positions) + shift,
                        asked=torch.tensor([asked_labels(q) for q in questions]), token_turns=turns_t,
                        turn_prefix=torch.tensor(prefixes) + shift * (torch.tensor(prefixes) > image_at),
                        position_ids=positions_t)


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
