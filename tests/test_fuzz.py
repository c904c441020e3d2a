"""Property tests (hypothesis): the loaders take any bytes, any JSON and any text without raising anything but
DataError and without losing a line; the answer extractors and the grader take any text without raising, always
give the same verdict, and find a known answer written in the usual final-answer forms."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raypipe.data.benchmarks import DataError, load_benchmark
from raypipe.data.pairs import load_pairs
from raypipe.grading import KINDS, extract_answer, grade, is_equivalent, last_boxed

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GRADER = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)
ROWS = st.fixed_dictionaries({}, optional={"id": st.integers(0, 3) | st.text(max_size=2), "question": JSON_VALUES,
                                           "answer": JSON_VALUES | st.integers().map(lambda n: f"So #### {n}")})


def non_blank_lines(data: bytes) -> int:
    """Lines the loaders must account for: every line that is not whitespace only (undecodable ones included)."""
    lines = data.split(b"\n")
    count = 0
    for number, line in enumerate(lines[:-1] if data.endswith(b"\n") else lines):
        try:
            count += bool(line.decode("utf-8-sig" if number == 0 else "utf-8").strip())
        except UnicodeDecodeError:
            count += 1
    return count


def load_both(data: bytes) -> None:
    """Both loaders on `data`: usable + rejected rows are every non-blank line, also when none is usable."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_bytes(data)
        expected = non_blank_lines(data)
        for load in (lambda: load_benchmark(path, "gsm8k"), lambda: load_pairs(path, "question", "answer")):
            try:
                loaded = load()
            except DataError as err:
                if expected == 0:
                    assert "no usable rows (0 rejected)" in str(err)
                else:
                    assert re.search(rf"no usable rows \({expected} rejected; first: row \d+, field '", str(err))
                continue
            assert len(loaded.rows) + len(loaded.rejected) == expected
            assert all(isinstance(r["question" if "question" in r else "query"], str) for r in loaded.rows)
            json.dumps(loaded.rejected)  # a rejected row can always be written out


@FAST
@given(st.binary(max_size=300))
@example(b"\xef\xbb\xbf\n\xff\n{}")  # byte-order mark, bad UTF-8, an empty object
@example(b"[" * 50_000)  # nested past Python's recursion limit
@example(b"1" * 5000)  # an integer longer than Python converts
@example(b'{"question": "\\ud800", "answer": "#### 1"}')  # a lone surrogate escape (cannot be written as UTF-8)
def test_loaders_take_any_bytes(data: bytes) -> None:
    load_both(data)


@FAST
@given(st.lists(ROWS | JSON_VALUES, max_size=8))
@example([{"question": "q", "answer": float("nan")}, {"question": "q", "answer": 1e300}, {"id": 1}, {"id": 1}])
def test_loaders_take_any_json(values: list[Any]) -> None:
    load_both("\n".join(json.dumps(v) for v in values).encode())


@FAST
@given(st.lists(st.text(max_size=40), max_size=8))
def test_loaders_take_any_text(lines: list[str]) -> None:
    load_both("\n".join(lines).encode())


@GRADER
@given(st.text(max_size=200), st.text(max_size=20), st.sampled_from(KINDS))
@example("The answer is " + "1" * 5000, "1" * 5000, "synthetic")  # more digits than int() converts
@example("\\boxed{\\frac{1}{0}} \\boxed{", "x^", "math")
@example("#### 1,2,3 $1,600.00 -\u22123/0", "3/0", "gsm8k")
def test_extraction_and_grading_never_raise_and_are_deterministic(text: str, gold: str, kind: str) -> None:
    predicted = extract_answer(text, kind)
    assert predicted is None or isinstance(predicted, str)
    assert extract_answer(text, kind) == predicted
    verdict = grade(text, gold, kind)
    assert verdict == grade(text, gold, kind)
    assert verdict.predicted == predicted
    assert verdict.reason in {"correct", "wrong", "no answer found", "unparseable"}
    assert verdict.correct == (verdict.reason == "correct")
    if predicted is not None:
        assert is_equivalent(predicted, gold, kind) == verdict.correct


SOLUTION_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="#\\"), max_size=80)
"""Working before a final answer: anything but a second '####' or a LaTeX command."""


@GRADER
@given(SOLUTION_TEXT, st.integers(-10**30, 10**30), st.booleans())
def test_a_gsm8k_final_answer_is_extracted(work: str, answer: int, commas: bool) -> None:
    written = f"{answer:,}" if commas else str(answer)
    text = f"{work}\n#### {written}"
    assert extract_answer(text, "gsm8k") == str(answer)
    assert grade(text, str(answer), "gsm8k").correct


BRACED = st.recursive(st.text(alphabet="abcxyz0123456789+-*/=^_., ()", max_size=8),
                      lambda inner: st.lists(inner, min_size=1, max_size=3).map(lambda p: "{" + "".join(p) + "}"),
                      max_leaves=6)
"""Answer text with nested, balanced braces and no LaTeX command."""


@GRADER
@given(SOLUTION_TEXT, st.lists(BRACED, min_size=1, max_size=3).map("".join).filter(lambda s: s.strip()))
def test_a_boxed_answer_is_extracted_with_its_nesting(work: str, answer: str) -> None:
    text = f"{work} so the answer is \\boxed{{{answer}}}."
    assert last_boxed(text) == answer.strip()
    assert extract_answer(text, "math") == answer.strip()


@GRADER
@given(SOLUTION_TEXT, st.integers(-10**6, 10**6))
def test_a_boxed_number_grades_correct(work: str, answer: int) -> None:
    assert grade(f"{work} \\boxed{{{answer}}}", str(answer), "math").correct


@GRADER
@given(SOLUTION_TEXT, st.integers(-10**40, 10**40))
def test_a_synthetic_answer_is_extracted(work: str, answer: int) -> None:
    text = f"{work}\nThe answer is {answer}."
    assert extract_answer(text, "synthetic") == str(answer)
    assert grade(text, str(answer), "synthetic").correct
