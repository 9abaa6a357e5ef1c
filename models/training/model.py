"""The untrained model for ``hires_detail``: the embedded architecture with a tokenizer of the task.

The tokenizer is trained in code on every prompt, question and answer of the task, so each answer
is a single token; it ships with the weights (``save_pretrained``), so token ids never drift.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.hires_detail import ANSWERS, every_question_text
from benchmarks.synthetic import SHORT_ANSWER_SUFFIX
from models.prompts import VICUNA_SYSTEM
from models.tiny import build_tiny_llava_next, build_tiny_tokenizer

FOLLOW_UP = "USER: {question} ASSISTANT:"  # LLaVA conv_vicuna_v1 turn after "</s>" (sep2)


def task_corpus() -> list[str]:
    """The text the tokenizer learns its merges from: the prompt template, every question, every answer."""
    lines = [VICUNA_SYSTEM, FOLLOW_UP.format(question=""), SHORT_ANSWER_SUFFIX.strip(), *every_question_text()]
    lines += [" ".join(answers) for answers in ANSWERS.values()]
    return lines


def build_untrained(seed: int = 0):
    """The embedded LLaVA-NeXT (model in eval mode, processor) with the task tokenizer; seeded init."""
    return build_tiny_llava_next(seed=seed, tokenizer=build_tiny_tokenizer(task_corpus()))


def save_pretrained(model, processor, path: str | Path) -> Path:
    """A llava-hf style directory (safetensors, config, processor and tokenizer) that ``model.path`` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path
