"""(query, response) datasets from JSONL, Parquet or a `datasets.save_to_disk` folder; a bad row is set aside
with its file, row and field, never dropped silently."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.data.rows import (DataError, DuplicateIds, Problem, RawRow, as_object, read_jsonl, sort_rows,
                               text_problem)


@dataclass
class PairRows:
    """Usable rows (`row`: 1-based position in the file, `query`, `response`, `record`: the whole input row)
    and the rejected ones (shape: `raypipe.data.rows.rejected_row`)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def load_pairs(path: Path, query_field: str, response_field: str, limit: int | None = None,
               id_field: str | None = "id", max_rejected_fraction: float = 1.0) -> PairRows:
    """Rows whose query and response are non-blank strings. A row whose `id_field` value repeats an earlier row's
    is rejected (rows without the field are not checked; None turns the check off). `limit`: stop after that many
    usable rows. More than `max_rejected_fraction` of the rows rejected is an error (1.0: never)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    ids = DuplicateIds(id_field)

    def parse(raw: RawRow) -> dict[str, Any] | Problem:
        record = raw.value
        problem = as_object(record) or ids.check(record, raw.row) or text_problem(
            record, query_field) or text_problem(record, response_field)
        return problem or {"query": record[query_field], "response": record[response_field], "record": record}

    rows, rejected = sort_rows(path, _records(path), parse, limit, max_rejected_fraction,
                               f" (fields '{query_field}' and '{response_field}' are read)")
    return PairRows(rows, rejected)


def _records(path: Path) -> Iterator[RawRow]:
    if path.is_dir():
        yield from _as_rows(_hf_dataset(path))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        yield from _as_rows(table.to_pylist())
    elif path.suffix in (".jsonl", ".json"):
        yield from read_jsonl(path)
    else:
        raise DataError(f"{path}: unsupported format (use .jsonl, .parquet or a datasets.save_to_disk folder)")


def _as_rows(records: Any) -> Iterator[RawRow]:
    for number, record in enumerate(records, start=1):
        yield RawRow(number, record, json.dumps(record, default=str))


def _hf_dataset(path: Path) -> Any:
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
    return dataset
