"""The step format shared by every method: prompts, splitting a chain of thought into steps, step boundaries.

A chain of thought is written one step per line (`Step k: ...`), ending with `The answer is X.`. Steps are
line-based so that a step boundary is always a token boundary (our tokenizers end a chunk at each newline),
which is what lets branching continue from a prefix's token ids without re-tokenising text.
"""

from __future__ import annotations

from collections.abc import Sequence

COT_PREFILL = "Let's think step by step.\n"
"""Written after the question, so the model's first token starts `Step 1:`."""

STEP_STOP = "\n"
"""Generation stops here when sampling a single step (kept in the output)."""


def format_prompt(question: str) -> str:
    """The prompt every method and engine uses: the question, then the step-by-step pre-fill."""
    return f"{question.strip()}\n{COT_PREFILL}"


def split_steps(completion: str) -> list[str]:
    """Split a completion into steps, one per line, each keeping its newline so that joining is exact."""
    return completion.splitlines(keepends=True)


def join_steps(steps: Sequence[str]) -> str:
    return "".join(steps)


def step_token_ends(token_texts: Sequence[str]) -> list[int]:
    """Token indices (exclusive ends) at which a step ends, from the decoded text of each token.

    A step ends after a token whose text ends with a newline; a last step without one ends at the last token.
    Token `i` belongs to step `j` iff ends[j-1] <= i < ends[j].
    """
    ends = [i + 1 for i, text in enumerate(token_texts) if text.endswith("\n")]
    if token_texts and (not ends or ends[-1] != len(token_texts)):
        ends.append(len(token_texts))
    return ends
