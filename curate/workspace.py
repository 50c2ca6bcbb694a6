"""A workspace is one directory; every table is a folder of Parquet parts inside it.

Parts are written to a temporary name and renamed into place, so a reader never sees a half-written file:
after a crash a table holds only whole parts, and the stage that crashed redoes only what is missing.
Every stage run also leaves a JSON manifest under ``manifests/``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

PART_SUFFIX = ".parquet"


class Workspace:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def table_dir(self, name: str) -> Path:
        return self.root / name

    def parts(self, name: str) -> list[Path]:
        """The finished Parquet parts of a table, in a stable order (temporary files are never listed)."""
        folder = self.table_dir(name)
        return sorted(folder.glob(f"*{PART_SUFFIX}")) if folder.is_dir() else []

    def has_table(self, name: str) -> bool:
        return bool(self.parts(name))

    def tables(self) -> dict[str, Path]:
        """Every table in the workspace: a folder holding Parquet parts, found at any depth.

        Nested folders get names joined by underscores: ``selections/easy`` is ``selections_easy``.
        """
        found: dict[str, Path] = {}
        if not self.root.is_dir():
            return found
        for folder in sorted(p for p in self.root.rglob("*") if p.is_dir()):
            if any(folder.glob(f"*{PART_SUFFIX}")):
                found["_".join(folder.relative_to(self.root).parts)] = folder
        return found

    def read_column(self, name: str, column: str) -> list[Any]:
        """One column of a table as a Python list (empty if the table does not exist yet)."""
        parts = self.parts(name)
        if not parts:
            return []
        return pq.read_table([str(p) for p in parts], columns=[column]).column(column).to_pylist()

    def write_part(self, name: str, table: pa.Table, *, schema: pa.Schema) -> Path | None:
        """Atomically add one Parquet part to a table; returns its path (None for an empty table)."""
        if table.num_rows == 0:
            return None
        folder = self.table_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        final = folder / f"part-{stamp}-{uuid.uuid4().hex[:8]}{PART_SUFFIX}"
        write_atomic_parquet(table.cast(schema), final)
        return final

    def write_manifest(self, stage: str, content: dict[str, Any]) -> Path:
        folder = self.root / "manifests"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = folder / f"{stage}-{stamp}-{uuid.uuid4().hex[:8]}.json"
        body = {"stage": stage, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), **content}
        write_atomic_text(path, json.dumps(body, indent=2, default=str) + "\n")
        return path


def write_atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    _fsync_and_replace(tmp, path)


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    _fsync_and_replace(tmp, path)


def _fsync_and_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rows_to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=schema)
