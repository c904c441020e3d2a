"""SFT (VFT) on the worked solutions: prompt + solution + EOS, loss on the solution and EOS only.

The same rows train the initial policy (round 0), the `sft` method and the continued-SFT control."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from raypipe.methods.base import BuildInputs
from raypipe.tasks import Problem, Task


def sft_rows(problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase, task: Task) -> list[dict[str, Any]]:
    """The task's prompt and the worked solution, tokenised separately so the loss mask is exact at the boundary."""
    rows = []
    for p in problems:
        if p.solution is None:
            raise ValueError(f"problem {p.id} has no worked solution to train on")
        prompt_ids = task.prompt_ids(tokenizer, p.question)
        answer_ids = tokenizer(p.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt_ids + answer_ids,
                     "loss_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)})
    return rows


def build(inputs: BuildInputs) -> list[dict[str, Any]]:
    """The `sft` method trains on the worked solutions again: no sampling, nothing new."""
    return [{"input_ids": r["input_ids"], "loss_mask": r["loss_mask"]} for r in inputs.worked]
