"""Read records from JSONL, JSON, CSV and Parquet files, one at a time, with their line/row number.

A reader never stops at a bad row: it yields a :class:`BadRow` for it and goes on, so every good row is kept.
Invalid UTF-8 is read with ``surrogateescape`` and reported per record, not per file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
RAW_LIMIT = 2000  # characters of an offending record kept in the rejects table


@dataclass(frozen=True)
class Record:
    row: int  # 1-based line (JSONL, CSV: the line the record starts on) or row index + 1 (JSON, Parquet)
    data: dict[str, Any]


@dataclass(frozen=True)
class BadRow:
    row: int  # 0 when the whole file is unreadable
    reason: str
    detail: str
    raw: str


def iter_rows(path: Path, *, max_row_bytes: int) -> Iterator[Record | BadRow]:
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; supported: {', '.join(SUFFIXES)}")
    for item in reader(path, max_row_bytes):
        yield _check_record(item, max_row_bytes) if isinstance(item, Record) else item


def has_invalid_text(value: Any) -> bool:
    """True if a string anywhere in ``value`` holds bytes that were not valid UTF-8 (surrogate escapes)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_invalid_text(k) or has_invalid_text(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_invalid_text(v) for v in value)
    return False


def shorten(text: str) -> str:
    text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return text if len(text) <= RAW_LIMIT else text[:RAW_LIMIT] + "…"


def _check_record(record: Record, max_row_bytes: int) -> Record | BadRow:
    raw = json.dumps(record.data, ensure_ascii=False, default=str)
    if has_invalid_text(record.data):
        return BadRow(record.row, "invalid_utf8", "the record holds bytes that are not valid UTF-8", shorten(raw))
    size = len(raw.encode("utf-8"))
    if size > max_row_bytes:
        return BadRow(record.row, "oversized", f"{size:,} bytes > --max-row-bytes {max_row_bytes:,}", shorten(raw))
    return record


def _object_or_bad(row: int, value: Any, raw: str) -> Record | BadRow:
    if isinstance(value, dict):
        return Record(row, value)
    return BadRow(row, "not_an_object", f"expected a JSON object, got {type(value).__name__}", shorten(raw))


def _jsonl(path: Path, max_row_bytes: int) -> Iterator[Record | BadRow]:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if len(line) > max_row_bytes:  # checked before parsing so a huge line costs no JSON work
                detail = f"{len(line):,} bytes > --max-row-bytes {max_row_bytes:,}"
                yield BadRow(number, "oversized", detail, shorten(line[:RAW_LIMIT].decode("utf-8", "replace")))
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield BadRow(number, "invalid_utf8", str(err), shorten(line.decode("utf-8", "replace")))
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                yield BadRow(number, "malformed_json", str(err), shorten(text))
                continue
            yield _object_or_bad(number, value, text)


def _json(path: Path, max_row_bytes: int) -> Iterator[Record | BadRow]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        yield BadRow(0, "malformed_json", f"the whole file is not valid JSON: {err}", shorten(text))
        return
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} wrappers are common
    if not isinstance(value, list):
        yield BadRow(0, "not_a_list", "a .json file must hold a list of records", shorten(text))
        return
    for index, item in enumerate(value):
        yield _object_or_bad(index + 1, item, json.dumps(item, ensure_ascii=False, default=str))


def _csv(path: Path, max_row_bytes: int) -> Iterator[Record | BadRow]:
    csv.field_size_limit(max(max_row_bytes * 2, 131072))  # oversized cells are rejected per row below
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        start = 2  # line 1 is the header
        while True:
            try:
                data = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield BadRow(start, "malformed_csv", str(err), "")
                start = reader.line_num + 1
                continue
            row, start = start, reader.line_num + 1
            if None in data:
                yield BadRow(row, "malformed_csv", "more cells than header columns", shorten(str(data[None])))
                continue
            missing = [key for key, cell in data.items() if cell is None]
            if missing:
                yield BadRow(row, "malformed_csv", f"fewer cells than header columns (no {missing})", "")
                continue
            yield Record(row, {key: _json_cell(cell) for key, cell in data.items()})


def _json_cell(cell: str) -> Any:
    """CSV has no lists: a cell holding a JSON list (e.g. a messages column) is parsed."""
    stripped = cell.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return cell
    return cell


def _parquet(path: Path, max_row_bytes: int) -> Iterator[Record | BadRow]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        yield BadRow(0, "unreadable_file", f"not a readable Parquet file: {err}", "")
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            row += 1
            yield Record(row, {key: _text_from_bytes(value) for key, value in item.items()})


def _text_from_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return value
