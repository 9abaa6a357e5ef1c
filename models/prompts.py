"""Prompt formats of the original LLaVA conversation templates, for single-turn image questions.

The papers' tables come from LLaVA's own scripts, which build prompts from ``conv_templates``;
the llava-hf chat templates are close but not always identical, so the format is chosen by name.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _vicuna_v1(question: str) -> str:
    # LLaVA conv "vicuna_v1" (SeparatorStyle.TWO, sep " "): "<system> USER: <msg> ASSISTANT:"
    return f"{VICUNA_SYSTEM} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


def _mistral_instruct(question: str) -> str:
    # LLaVA conv "mistral_instruct" (LLAMA_2 style, empty system): "[INST] <msg> [/INST]"
    return f"[INST] {IMAGE_PLACEHOLDER}\n{question} [/INST]"


PROMPT_FORMATS = {"vicuna_v1": _vicuna_v1, "mistral_instruct": _mistral_instruct}


def format_prompt(question: str, style: str) -> str:
    """The single-turn prompt for ``question`` with one ``<image>`` placeholder before it."""
    try:
        return PROMPT_FORMATS[style](question)
    except KeyError:
        raise ValueError(f"unknown prompt format {style!r}; allowed: {', '.join(PROMPT_FORMATS)}") from None
