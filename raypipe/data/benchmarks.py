"""Loading JSONL benchmarks (GSM8K, MATH-500, ...) where a bad row is reported and set aside, never dropped."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.grading import extract_answer

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A user's data file cannot be used at all (missing, or no usable row); the message names the file."""


@dataclass
class BenchmarkRows:
    """The usable rows of a file, and the rejected ones with where and why."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def load_benchmark(path: Path, kind: str, limit: int | None = None) -> BenchmarkRows:
    """Rows with `question` and `gold` (the final answer extracted from `answer` by the `kind` grader)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = BenchmarkRows()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(out.rows) >= limit:
                break
            if not line.strip():
                continue
            problem = _parse(line, kind)
            if isinstance(problem, tuple):
                where, why = problem
                log.warning("%s:%d: field '%s': %s (row set aside)", path, number, where, why)
                out.rejected.append({"file": str(path), "line": number, "field": where, "error": why,
                                     "raw": line.rstrip("\n")})
            else:
                out.rows.append({"line": number, **problem})
    if not out.rows:
        raise DataError(f"{path}: no usable rows ({len(out.rejected)} rejected)")
    return out


def _parse(line: str, kind: str) -> dict[str, str] | tuple[str, str]:
    """A row, or (field, reason) when it is unusable."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return "<row>", f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return "<row>", "expected a JSON object"
    for name in ("question", "answer"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            return name, "missing or not a non-empty string"
    gold = extract_answer(record["answer"], kind)
    if gold is None:
        return "answer", f"no final answer found for kind '{kind}'"
    return {"question": record["question"], "gold": gold}
