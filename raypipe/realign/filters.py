"""ReAlign's post-filters: when a rewrite looks broken, the row keeps its original response, and says why."""

from __future__ import annotations

import re

from raypipe.grading import extract_answer, is_equivalent

PLANNING_TASK = "planning"


def has_code(text: str) -> bool:
    """A fenced code block, or a Python-looking function (both `def ` and `return `)."""
    return "```" in text or ("def " in text and "return " in text)


def exam_answer(response: str) -> tuple[str, str] | None:
    """(answer, grader kind) when the original is exam-style: one letter, True / False, a bare number, a GSM8K
    `#### n` or a MATH `\\boxed{}` final answer. The rewrite must keep it."""
    stripped = response.strip()
    if re.fullmatch(r"[A-Za-z]", stripped) or stripped in ("True", "False"):
        return stripped, "word"
    if re.fullmatch(r"-?\d[\d,]*(?:\.\d+)?", stripped):
        return stripped, "gsm8k"
    for kind, marker in (("gsm8k", "####"), ("math", "\\boxed")):
        if marker in response:
            answer = extract_answer(response, kind)
            if answer is not None:
                return answer, kind
    return None


def keeps_answer(rewrite: str, answer: str, kind: str) -> bool:
    if kind == "word":
        return re.search(rf"(?<![A-Za-z]){re.escape(answer)}(?![A-Za-z])", rewrite) is not None
    if kind == "gsm8k":
        return any(is_equivalent(n, answer, "gsm8k") for n in re.findall(r"-?\d[\d,]*(?:\.\d+)?", rewrite))
    predicted = extract_answer(rewrite, "math")
    return predicted is not None and is_equivalent(predicted, answer, "math")


def skip_before_rewrite(query: str, task: str) -> str | None:
    """A reason not to ask for a rewrite at all: a planning task whose query never mentions a plan (most likely
    a misclassified query)."""
    if task == PLANNING_TASK and "plan" not in query.lower():
        return "no_planning_keyword"
    return None


def fallback_reason(original: str, rewrite: str, min_length_ratio: float) -> str | None:
    """Why `rewrite` must not replace `original`, or None when it may."""
    if has_code(original) != has_code(rewrite):
        return "code_mismatch"
    answer = exam_answer(original)
    if answer is not None and not keeps_answer(rewrite, *answer):
        return "answer_lost"
    if len(rewrite.split()) < min_length_ratio * len(original.split()):
        return "too_short"
    return None
