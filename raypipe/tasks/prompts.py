"""Prompts as the model expects them: one function builds the prompt for sampling, evaluation, `raypipe eval` and
the served demo, so training, evaluation and serving see the same text.

A tokenizer with a chat template gets `apply_chat_template` (an optional system message, the question plus an
optional instruction as the user turn, the generation prompt added). Without one, the plain template: the question
and the step-by-step pre-fill. The tiny model's own template renders a user turn exactly as the plain template, so
an OpenAI chat client of a served tiny model sees the prompt it was trained on.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from raypipe.data.steps import format_prompt


def user_message(question: str, instruction: str | None = None) -> str:
    """The user turn: the question, and the instruction on its own line when there is one."""
    return f"{question.strip()}\n{instruction.strip()}" if instruction else question.strip()


def chat_messages(question: str, system_prompt: str | None = None,
                  instruction: str | None = None) -> list[dict[str, Any]]:
    """The chat a prompt is rendered from (also what the demo page sends to /v1/chat/completions)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": user_message(question, instruction)}]


def plain_prompt(question: str, instruction: str | None = None) -> str:
    """The prompt of a model without a chat template."""
    return format_prompt(user_message(question, instruction))


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system_prompt: str | None = None,
                 instruction: str | None = None) -> str:
    """The prompt text for `question` under `tokenizer`'s chat template, or the plain one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(question, system_prompt, instruction),  # type: ignore
                                             add_generation_prompt=True, tokenize=False)
    return plain_prompt(question, instruction)
