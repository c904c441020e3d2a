"""Supervised fine-tuning rows: prompt + worked solution + EOS, loss on the solution and EOS only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from raypipe.data.synthetic import Problem


def sft_rows(problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """Tokenise prompt and solution separately so the loss mask is exact at the boundary."""
    rows = []
    for p in problems:
        prompt_ids = tokenizer(p.prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(p.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt_ids + answer_ids,
                     "loss_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)})
    return rows
