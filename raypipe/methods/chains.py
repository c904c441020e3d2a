"""Turning a round's graded samples into training rows: whole answers as token ids, grouped by question.

Whole answers (RFT, DPO, IPO, AFT) end with the end-of-sequence token when the policy ended them there, so the
model learns to stop; a sample cut by max_tokens gets none. Step-DPO's single steps never get one (stepdpo.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any


def answer_ids(sample: dict[str, Any], eos_id: int) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of prompt + completion (+ EOS): the loss covers the completion only."""
    completion = list(sample["completion_ids"]) + ([eos_id] if sample["finish_reason"] == "eos" else [])
    prompt = list(sample["prompt_ids"])
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def distinct_by_question(graded: Iterable[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Each question's samples with duplicate completions removed (first kept), in sample order."""
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    seen: set[tuple[int, str]] = set()
    for sample in graded:
        key = (sample["qid"], sample["completion"])
        if key not in seen:
            seen.add(key)
            out[sample["qid"]].append(sample)
    return dict(out)
