"""(query, response) datasets from JSONL, Parquet or a `datasets.save_to_disk` folder; a bad row is set aside
with its file, row and field, never dropped silently."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.data.rows import (DuplicateIds, Problem, RawRow, as_object, read_records, sort_rows,
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
    ids = DuplicateIds(id_field)

    def parse(raw: RawRow) -> dict[str, Any] | Problem:
        record = raw.value
        problem = as_object(record) or ids.check(record, raw.row) or text_problem(
            record, query_field) or text_problem(record, response_field)
        return problem or {"query": record[query_field], "response": record[response_field], "record": record}

    rows, rejected = sort_rows(path, read_records(path), parse, limit, max_rejected_fraction,
                               f" (fields '{query_field}' and '{response_field}' are read)")
    return PairRows(rows, rejected)
