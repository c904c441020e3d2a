"""The step format shared by every method: the plain prompt, and cutting a chain of thought into steps.

A chain of thought is a sequence of steps separated by a delimiter the task chooses (`StepSplitter`): one per line
(the embedded task's `Step k: ...` lines, GSM8K's working lines), one per paragraph (MATH solutions), at each
`Step k:` marker, or at any regular expression. Whitespace-only steps are dropped (merged into their neighbour),
so a blank line is never a step. Branching continues from a prefix's token ids, so steps are also cut at token
level (`StepSplitter.token_ends`): a boundary inside a token is moved to that token's end.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from itertools import accumulate

COT_PREFILL = "Let's think step by step.\n"
"""Written after the question in the plain prompt, so the model's first token starts the first step."""

DELIMITERS = {"newline": r"\n", "blank_line": r"\n[ \t]*\n\s*", "step_marker": r"(?=\bStep \d+\s*:)"}
"""Named step delimiters; any other `task.step_delimiter` is read as a regular expression. A step boundary is the
end of each match (a zero-width match, like the `Step k:` lookahead, cuts just before the marker)."""


def format_prompt(question: str) -> str:
    """The plain prompt (models without a chat template): the question, then the step-by-step pre-fill."""
    return f"{question.strip()}\n{COT_PREFILL}"


class StepSplitter:
    """Cuts text, or a sequence of decoded tokens, into steps at a delimiter (a name in DELIMITERS or a regex)."""

    def __init__(self, delimiter: str = "newline") -> None:
        self.delimiter = delimiter
        try:
            self.pattern = re.compile(DELIMITERS.get(delimiter, delimiter))
        except re.error as err:
            raise ValueError(f"step delimiter {delimiter!r} is neither one of {sorted(DELIMITERS)} nor a valid "
                             f"regular expression ({err})") from None

    def ends(self, text: str) -> list[int]:
        """Character offsets (exclusive) at which each step ends; the last is len(text). Whitespace-only steps
        are merged into the step before them (a leading one into the step after)."""
        cuts = sorted({m.end() for m in self.pattern.finditer(text)} - {0, len(text)})
        ends: list[int] = []
        start = 0
        for end in [*cuts, len(text)] if text else []:
            if text[start:end].strip() or not ends:
                ends.append(end)
            else:
                ends[-1] = end
            start = end
        if len(ends) > 1 and not text[: ends[0]].strip():  # a whitespace-only first step joins the second
            ends.pop(0)
        return ends

    def split(self, text: str) -> list[str]:
        """The steps of `text`, each keeping its delimiter, so joining them gives `text` back exactly."""
        ends = self.ends(text)
        return [text[a:b] for a, b in zip([0, *ends], ends)]

    def token_ends(self, token_texts: Sequence[str]) -> list[int]:
        """Token indices (exclusive) at which each step ends, from the decoded text of each token.

        Token `i` belongs to step `j` iff ends[j-1] <= i < ends[j]. A boundary inside a token moves to that
        token's end (the token stays with the earlier step); steps that collapse onto one token end merge.
        """
        char_ends = list(accumulate(len(t) for t in token_texts))
        out: list[int] = []
        for end in self.ends("".join(token_texts)):
            token_end = bisect.bisect_left(char_ends, end) + 1
            if not out or token_end > out[-1]:
                out.append(min(token_end, len(token_texts)))
        if token_texts and (not out or out[-1] != len(token_texts)):
            out.append(len(token_texts))
        return out


LINES = StepSplitter("newline")


def split_steps(completion: str) -> list[str]:
    """Split a completion into one step per non-blank line, each keeping its newline."""
    return LINES.split(completion)


def step_token_ends(token_texts: Sequence[str]) -> list[int]:
    """`LINES.token_ends`: the line-per-step boundaries of a decoded token sequence."""
    return LINES.token_ends(token_texts)
