"""(query, response) datasets from JSONL, Parquet or a `datasets.save_to_disk` folder; a bad row is set aside
with its file, row and field, never dropped silently."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.data.benchmarks import DataError

log = logging.getLogger(__name__)


@dataclass
class PairRows:
    """Usable rows (`row`: 1-based position in the file, `query`, `response`, `record`: the whole input row)
    and the rejected ones with where and why."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def load_pairs(path: Path, query_field: str, response_field: str, limit: int | None = None) -> PairRows:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    out = PairRows()
    for number, record, problem in _records(path):
        if limit is not None and len(out.rows) >= limit:
            break
        if problem is None:
            problem = _check(record, query_field, response_field)
        if problem is not None:
            where, why = problem
            log.warning("%s: row %d: field '%s': %s (row set aside)", path, number, where, why)
            out.rejected.append({"file": str(path), "row": number, "field": where, "error": why,
                                 "raw": record if isinstance(record, str) else json.dumps(record, default=str)})
            continue
        out.rows.append({"row": number, "query": record[query_field], "response": record[response_field],
                         "record": record})
    if not out.rows:
        raise DataError(f"{path}: no usable rows ({len(out.rejected)} rejected; fields '{query_field}' and "
                        f"'{response_field}' are read)")
    return out


def _check(record: Any, query_field: str, response_field: str) -> tuple[str, str] | None:
    if not isinstance(record, dict):
        return "<row>", "expected an object with named fields"
    for name in (query_field, response_field):
        if not isinstance(record.get(name), str) or not record[name].strip():
            return name, "missing or not a non-empty string"
    return None


Record = tuple[int, Any, tuple[str, str] | None]
"""(row number, the row or its raw text, (field, reason) when it could not even be read)."""


def _records(path: Path) -> Iterator[Record]:
    if path.is_dir():
        yield from _hf_dataset(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, record, None
    elif path.suffix in (".jsonl", ".json"):
        yield from _jsonl(path)
    else:
        raise DataError(f"{path}: unsupported format (use .jsonl, .parquet or a datasets.save_to_disk folder)")


def _jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, raw.decode("utf-8", errors="replace").rstrip("\n"), (
                    "<row>", f"not UTF-8 (byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as err:
                yield number, line.rstrip("\n"), ("<row>", f"not valid JSON ({err.msg} at column {err.colno})")


def _hf_dataset(path: Path) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face dataset folder needs the `datasets` package") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a datasets.save_to_disk folder ({err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path}: holds several splits ({', '.join(dataset)}); point at one split's folder")
    for number, record in enumerate(dataset, start=1):
        yield number, record, None
