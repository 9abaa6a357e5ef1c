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


ROPE_THETA = 1e6  # not model=tiny's 10^4: more of RoPE's frequencies stay near-constant across ~3k image
# tokens, so content matches position-independently (the decoder learned its look-ups in ~600 symbolic
# steps with 10^6, had not after 600 with 10^4; Llama 3 and Qwen2 use 5x10^5 and 10^6)


def build_untrained(seed: int = 0, rope_theta: float = ROPE_THETA):
    """The embedded LLaVA-NeXT (model in eval mode, processor) with the task tokenizer; seeded init."""
    return build_tiny_llava_next(seed=seed, tokenizer=build_tiny_tokenizer(task_corpus()), rope_theta=rope_theta)


def save_pretrained(model, processor, path: str | Path) -> Path:
    """A llava-hf style directory (safetensors, config, processor and tokenizer) that ``model.path`` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path
