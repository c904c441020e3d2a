"""Final-answer extraction and equivalence for GSM8K, MATH and the synthetic task.

Every rollout, preference pair and eval number in the pipeline is decided here, so the rules follow
METHODS.md exactly and nothing raises on model output: a completion we cannot read is graded wrong.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from math_verify import parse, verify

KINDS: tuple[str, ...] = ("gsm8k", "math", "synthetic")

# Seconds math-verify may spend per parse/verify call. Its timeout is signal-based, which only works in the
# main thread, so other threads (threaded Ray actors, thread pools) run without one.
MATH_VERIFY_TIMEOUT_S = 5

# A number as written in GSM8K-style text: thousands separators only in groups of three (so "1,2,3" is a
# list, not 123), an optional decimal part or "/denominator", and a minus sign only when it cannot be the
# subtraction in "3-4".
_NUMBER = r"(?:(?<![\w)])[-\u2212])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+|/\d+)?(?![\d])"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
_SYNTHETIC_RE = re.compile(r"The answer is\s*(-?\d+)(?!\.?\d|,\d)", re.IGNORECASE)
_BOX_OPENERS = (r"\boxed{", r"\fbox{")
_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\{([^{}]*)\}")
_WORD_RE = re.compile(r"[A-Za-z]{2,}(?: [A-Za-z]+)*")


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one completion; `reason` is one of correct/wrong/no answer found/unparseable."""

    correct: bool
    predicted: str | None
    reason: str


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; valid kinds are: {', '.join(KINDS)}")


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...}; braces are matched, so nesting is kept."""
    starts = sorted((m.end() for opener in _BOX_OPENERS for m in re.finditer(re.escape(opener), text)),
                    reverse=True)
    for start in starts:
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
        # Unbalanced (e.g. a truncated generation): try the previous box.
    return None


def _after_answer_is(text: str) -> str | None:
    """The rest of the line after the last 'The answer is' (optional colon), or None."""
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    return text[matches[-1].end():].split("\n", 1)[0].strip()


def _numbers(text: str) -> list[str]:
    """Numbers in `text` with currency, commas and units dropped; \\frac{a}{b} becomes a/b."""
    found = _NUMBER_RE.findall(_FRAC_RE.sub(r"\1/\2", text))
    return [number.replace(",", "").replace("\u2212", "-") for number in found]


def _first_number(text: str) -> str | None:
    numbers = _numbers(text)
    return numbers[0] if numbers else None


def _extract_gsm8k(text: str) -> str | None:
    """'####', then 'The answer is', then the last box, then the last number: most explicit marker wins."""
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    tail = _after_answer_is(text)
    if tail is not None and (found := _first_number(tail)) is not None:
        return found
    boxed = last_boxed(text)
    if boxed is not None and (found := _first_number(boxed)) is not None:
        return found
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _strip_delimiters(answer: str) -> str:
    """Drop the sentence period and inline-math dollars: '$\\frac{1}{2}$.' -> '\\frac{1}{2}'."""
    return answer.strip().rstrip(".").strip().strip("$").strip().rstrip(".").strip()


def _extract_math(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    tail = _after_answer_is(text)
    if tail is None:
        return None
    return _strip_delimiters(tail) or None


def _canonical_int(digits: str) -> str:
    """str(int(digits)) without int(): Python refuses to convert more than 4,300 digits, and a model can write more."""
    body = digits.lstrip("-").lstrip("0") or "0"
    return body if body == "0" or not digits.startswith("-") else f"-{body}"


def _extract_synthetic(text: str) -> str | None:
    matches = _SYNTHETIC_RE.findall(text)
    return _canonical_int(matches[-1]) if matches else None


def extract_answer(text: str, kind: str) -> str | None:
    """The final answer written in `text` under the rules for `kind`, or None when there is none."""
    _check_kind(kind)
    return {"gsm8k": _extract_gsm8k, "math": _extract_math, "synthetic": _extract_synthetic}[kind](text)


def _to_fraction(value: str) -> Fraction | None:
    """Exact value of a GSM8K-style answer ('$1,600.00', '72 dollars', '3/4'); None if it holds no number."""
    number = _first_number(value)
    if number is None:
        return None
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def _compare_gsm8k(pred: str, gold: str) -> bool | None:
    pred_value, gold_value = _to_fraction(pred), _to_fraction(gold)
    if pred_value is None or gold_value is None:
        return None
    return pred_value == gold_value


def _compare_synthetic(pred: str, gold: str) -> bool | None:
    pred_match = re.fullmatch(r"\s*(-?\d+)\.?\s*", pred)
    gold_match = re.fullmatch(r"\s*(-?\d+)\.?\s*", gold)
    if pred_match is None or gold_match is None:
        return None
    return _canonical_int(pred_match.group(1)) == _canonical_int(gold_match.group(1))


def _normalize_latex(answer: str) -> str:
    """Cheap canonical form for string comparison when a side is not mathematics math-verify can read."""
    answer = _TEXT_WRAPPER_RE.sub(r"\1", answer)
    for token in (r"\left", r"\right", r"\!", r"\,", r"\;", r"\ ", "^\\circ", "^{\\circ}", "$", " "):
        answer = answer.replace(token, "")
    return answer.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").rstrip(".").lower()


def _as_word(answer: str) -> str | None:
    """The answer as a plain word/phrase ('\\text{Evelyn}' -> 'evelyn'), or None if it is not one.

    math-verify reads a bare word as a product of single-letter symbols, so 'Evelyn' would equal its
    anagram 'Evleyn'; words are therefore compared as strings instead.
    """
    unwrapped = _strip_delimiters(_TEXT_WRAPPER_RE.sub(r"\1", answer))
    return unwrapped.lower() if _WORD_RE.fullmatch(unwrapped) else None


def _math_verify_timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _compare_math(pred: str, gold: str) -> bool | None:
    pred_word, gold_word = _as_word(pred), _as_word(gold)
    if pred_word is not None or gold_word is not None:
        return pred_word == gold_word
    timeout = _math_verify_timeout()
    try:
        # \boxed{} makes math-verify take the whole answer as one expression (e.g. "1,-2" is one set).
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        if any(not isinstance(x, str) for x in gold_parsed) and any(
            not isinstance(x, str) for x in pred_parsed
        ):
            return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify/sympy can raise on odd input or time out: not gradable, not a crash.
        return None
    return True if _normalize_latex(pred) == _normalize_latex(gold) else None


def _compare(pred: str, gold: str, kind: str) -> bool | None:
    """True/False when both sides could be read; None when one could not (graded as unparseable)."""
    _check_kind(kind)
    if kind == "gsm8k":
        return _compare_gsm8k(pred, gold)
    if kind == "synthetic":
        return _compare_synthetic(pred, gold)
    return _compare_math(pred, gold)


def is_equivalent(pred: str, gold: str, kind: str) -> bool:
    """Whether the predicted final answer means the same as the gold one under the rules for `kind`."""
    return _compare(pred, gold, kind) is True


def grade(text: str, gold: str, kind: str) -> GradeResult:
    """Grade a full completion against the gold final answer; never raises on model output."""
    predicted = extract_answer(text, kind)
    if predicted is None:
        return GradeResult(correct=False, predicted=None, reason="no answer found")
    outcome = _compare(predicted, gold, kind)
    if outcome is None:
        return GradeResult(correct=False, predicted=predicted, reason="unparseable")
    return GradeResult(correct=outcome, predicted=predicted, reason="correct" if outcome else "wrong")
