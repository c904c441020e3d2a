"""Reading a user's rows so that nothing is lost: every JSONL line is read as bytes and parsed on its own, so bad
UTF-8 or bad JSON is that row's problem, not the file's; a bad row becomes one rejected record of a fixed shape
(`file`, `row`, `field`, `reason`, `error`, `raw`) whose `reason` code the manifests count."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ROW = "<row>"
"""The `field` of a problem with the whole row (not JSON, not an object, not UTF-8)."""


class DataError(ValueError):
    """A user's data file cannot be used at all (missing, unreadable, or no usable row); the message names the file."""


@dataclass(frozen=True)
class Problem:
    """Why a row is set aside: the field at fault, a stable reason code (counted in manifests), and the message."""

    field: str
    reason: str
    error: str


@dataclass(frozen=True)
class RawRow:
    """One input row before its fields are checked."""

    row: int
    """1-based: the line number in a JSONL file (blank lines count), the row index in Parquet or a dataset."""
    value: Any
    """The parsed row (None when `problem` says it could not be read)."""
    raw: str
    """The row as the user wrote it (a JSONL line) or as JSON (a Parquet or dataset row), for rejected.jsonl."""
    problem: Problem | None = None


def read_jsonl(path: Path) -> Iterator[RawRow]:
    """Every non-blank line of a JSONL file. Blank means whitespace only; a UTF-8 byte-order mark is allowed on the
    first line (editors on Windows write one)."""
    with path.open("rb") as lines:
        for number, data in enumerate(lines, start=1):
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                offset = err.start + len(data) - len(err.object)  # utf-8-sig reports positions after the mark
                yield RawRow(number, None, data.decode("utf-8", errors="replace").rstrip("\r\n"),
                             Problem(ROW, "not_utf8", f"not UTF-8 (byte {offset}: {data[offset]:#04x})"))
                continue
            if not line.strip():
                continue
            yield _parse_line(number, line.rstrip("\r\n"))


def _parse_line(number: int, line: str) -> RawRow:
    try:
        return RawRow(number, json.loads(line), line)
    except json.JSONDecodeError as err:
        why = f"{err.msg} at column {err.colno}"
    except RecursionError:
        why = "nested too deeply"
    except ValueError as err:  # e.g. an integer longer than Python converts (4300 digits)
        why = str(err)
    return RawRow(number, None, line, Problem(ROW, "invalid_json", f"not valid JSON ({why})"))


def json_type(value: Any) -> str:
    """A value's type in the words of JSON, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {int: "a number", float: "a number", str: "a string", dict: "an object", list: "a list"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


def as_object(value: Any) -> Problem | None:
    return None if isinstance(value, dict) else Problem(ROW, "not_an_object",
                                                        f"expected an object with named fields, got {json_type(value)}")


def text_problem(record: dict[str, Any], name: str) -> Problem | None:
    """Whether `record[name]` is usable text: present, a string, not blank, encodable (no lone surrogate escape)."""
    if name not in record or record[name] is None:
        return Problem(name, "missing_field", "missing")
    value = record[name]
    if not isinstance(value, str):
        return Problem(name, "wrong_type", f"expected a string, got {json_type(value)} ({_short(value)})")
    if not value.strip():
        return Problem(name, "empty_field", "empty (whitespace only)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return Problem(name, "invalid_text", f"holds an unpaired surrogate escape at character {err.start}")
    return None


class DuplicateIds:
    """Remembers the row of each id seen; a repeated id is a problem naming the first row. Rows without the id
    field (or with a null id) are not checked."""

    def __init__(self, id_field: str | None) -> None:
        self.id_field = id_field
        self.first: dict[str, int] = {}

    def check(self, record: dict[str, Any], row: int) -> Problem | None:
        if self.id_field is None or record.get(self.id_field) is None:
            return None
        key = json.dumps(record[self.id_field], sort_keys=True, default=str)
        first = self.first.setdefault(key, row)
        if first == row:
            return None
        return Problem(self.id_field, "duplicate_id", f"duplicate id {_short(record[self.id_field])} (first at row "
                                                      f"{first})")


def rejected_row(path: Path, row: int, problem: Problem, raw: str) -> dict[str, Any]:
    """The record written to rejected.jsonl, logged as it is made."""
    log.warning("%s: row %d: field '%s': %s (row set aside)", path, row, problem.field, problem.error)
    return {"file": str(path), "row": row, "field": problem.field, "reason": problem.reason, "error": problem.error,
            "raw": raw}


def counts_by_reason(rejected: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Rejected rows per reason code, most frequent first: what a manifest reports."""
    return dict(Counter(r["reason"] for r in rejected).most_common())


def write_rejected(out: Path, rejected: list[dict[str, Any]]) -> dict[str, Any]:
    """`out`/rejected.jsonl (one record per set-aside row) and the counts a stage manifest reports."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
    return {"rejected": len(rejected), "rejected_by_reason": counts_by_reason(rejected)}


def no_usable_rows(path: Path, rejected: list[dict[str, Any]], note: str = "") -> DataError:
    """The error for a file none of whose rows can be used, with the first row's reason (usually everyone's)."""
    first = (f"; first: row {rejected[0]['row']}, field '{rejected[0]['field']}': {rejected[0]['error']}"
             if rejected else "")
    return DataError(f"{path}: no usable rows ({len(rejected)} rejected{first}){note}")


def check_rejected(path: Path, usable: int, rejected: list[dict[str, Any]], max_fraction: float) -> None:
    """Stop when more than `max_fraction` of the rows read were set aside: past some share a file is more likely
    mapped wrong (another field name, another format) than dirty, and training on its remainder would mislead."""
    total = usable + len(rejected)
    if total and len(rejected) / total > max_fraction:
        first = rejected[0]
        raise DataError(f"{path}: {len(rejected)} of {total} rows rejected ({len(rejected) / total:.0%}), more than "
                        f"max_rejected_fraction {max_fraction:g} allows; first: row {first['row']}, field "
                        f"'{first['field']}': {first['error']}")


def sort_rows(path: Path, raws: Iterable[RawRow], parse: Callable[[RawRow], dict[str, Any] | Problem],
              limit: int | None, max_rejected_fraction: float,
              fields_note: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(usable rows with their `row` number, rejected records) of a loader's `raws`, each parsed by `parse`;
    at most `limit` usable rows. None usable, or more rejected than `max_rejected_fraction`, is a DataError
    (`fields_note` says which fields were read)."""
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for raw in raws:
        if limit is not None and len(rows) >= limit:
            break
        parsed = raw.problem or parse(raw)
        if isinstance(parsed, Problem):
            rejected.append(rejected_row(path, raw.row, parsed, raw.raw))
        else:
            rows.append({"row": raw.row, **parsed})
    if not rows:
        raise no_usable_rows(path, rejected, fields_note)
    check_rejected(path, len(rows), rejected, max_rejected_fraction)
    return rows, rejected


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)  # ASCII: a message must print on any terminal
    return text if len(text) <= limit else text[:limit] + "..."


def read_records(path: Path) -> Iterator[RawRow]:
    """The rows of a .jsonl / .parquet file, a `datasets.save_to_disk` folder, or `hf:NAME[:CONFIG]:SPLIT` (a hub
    dataset, which needs a network); a file that cannot be read at all is a DataError naming it."""
    if str(path).startswith("hf:"):
        yield from _as_rows(_hub_dataset(str(path)))
        return
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
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


def _hub_dataset(spec: str) -> Any:
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{spec}: write a hub dataset as hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    import datasets

    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name or split: the hub client raises many types
        raise DataError(f"{spec}: cannot load the hub dataset ({type(err).__name__}: {err})") from None
