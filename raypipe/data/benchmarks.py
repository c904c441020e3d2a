"""Loading JSONL benchmarks (GSM8K, MATH-500, ...) where a bad row is reported and set aside, never dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.data.rows import (DataError, DuplicateIds, Problem, as_object, json_type, read_jsonl, sort_rows,
                               text_problem)
from raypipe.grading import KINDS, extract_answer

__all__ = ["BenchmarkRows", "DataError", "load_benchmark"]  # DataError is imported from here across raypipe


@dataclass
class BenchmarkRows:
    """Usable rows (`row`: 1-based line number, `question`, `gold`) and the rejected ones (shape:
    `raypipe.data.rows.rejected_row`)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def load_benchmark(path: Path, kind: str, limit: int | None = None, id_field: str | None = "id",
                   max_rejected_fraction: float = 1.0) -> BenchmarkRows:
    """Rows with `question` and `gold`, the final answer of `answer` under the `kind` grader.

    `answer` is a worked solution the grader extracts the final answer from (GSM8K's `#### 42`, MATH's
    `\\boxed{}`), or a JSON number, which is the final answer itself (some datasets store it so). A row whose
    `id_field` value repeats an earlier row's is rejected (rows without the field are not checked; None turns the
    check off). `limit`: stop after that many usable rows. More than `max_rejected_fraction` of the rows rejected
    is an error (1.0: never).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; valid kinds are: {', '.join(KINDS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    ids = DuplicateIds(id_field)
    rows, rejected = sort_rows(path, read_jsonl(path), lambda raw: _parse(raw.value, kind, ids, raw.row), limit,
                               max_rejected_fraction, " (fields 'question' and 'answer' are read)")
    return BenchmarkRows(rows, rejected)


def _parse(record: Any, kind: str, ids: DuplicateIds, row: int) -> dict[str, str] | Problem:
    """The row's question and gold answer, or why it is unusable."""
    problem = as_object(record) or ids.check(record, row) or text_problem(record, "question")
    if problem is not None:
        return problem
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        gold = json.dumps(answer)
        if any(c not in "-.0123456789" for c in gold):
            return Problem("answer", "wrong_type", f"the number {gold} is not written out in digits; give it as a "
                                                   "string")
        return {"question": record["question"], "gold": gold}
    if answer is not None and not isinstance(answer, str):
        return Problem("answer", "wrong_type", f"expected a string or a number, got {json_type(answer)}")
    problem = text_problem(record, "answer")
    if problem is not None:
        return problem
    gold = extract_answer(answer, kind)
    if gold is None:
        return Problem("answer", "no_final_answer", f"no final answer found for kind '{kind}'")
    return {"question": record["question"], "gold": gold}
