"""A workspace is one directory; every table is a folder of Parquet parts inside it.

Parts are written to a temporary name and renamed into place, so a reader never sees a half-written file:
after a crash a table holds only whole parts, and the stage that crashed redoes only what is missing.
One process writes at a time (``Workspace.writing``, a lock in ``.curate/lock``); readers never wait.
Every stage run is recorded in the ``runs`` table (curate.kernel.runs) and leaves a JSON manifest under
``manifests/``. Folders whose name starts with a dot (the lock, staging folders) are never tables.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.kernel.atomic import is_stale, write_atomic, write_atomic_text
from curate.kernel.lock import writer_lock

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
        return sorted(p for p in folder.glob(f"*{PART_SUFFIX}") if not p.name.startswith(".")) if folder.is_dir() else []

    def has_table(self, name: str) -> bool:
        return bool(self.parts(name))

    def tables(self) -> dict[str, Path]:
        """Every table in the workspace: a folder holding Parquet parts, found at any depth.

        Nested folders get names joined by underscores: ``selections/easy`` is ``selections_easy``.
        Hidden folders (a leading dot: the lock, staging folders of a write in progress) are skipped.
        """
        found: dict[str, Path] = {}
        if not self.root.is_dir():
            return found
        for folder in sorted(p for p in self.root.rglob("*") if p.is_dir()):
            relative = folder.relative_to(self.root).parts
            if any(part.startswith(".") for part in relative):
                continue
            if any(not p.name.startswith(".") for p in folder.glob(f"*{PART_SUFFIX}")):
                found["_".join(relative)] = folder
        return found

    def read_column(self, name: str, column: str) -> list[Any]:
        """One column of a table as a Python list (empty if the table does not exist yet)."""
        parts = self.parts(name)
        if not parts:
            return []
        return pq.read_table([str(p) for p in parts], columns=[column]).column(column).to_pylist()

    @contextlib.contextmanager
    def writing(self, command: str | None = None) -> Iterator[None]:
        """Hold this workspace's writer lock for the block (re-entrant; a second process refuses at once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with writer_lock(self.root, command=command) as stale:
            if stale:
                removed = [p for p in self.root.rglob(".*") if is_stale(p)]
                for path in removed:  # no other writer runs: what the dead one left is garbage
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                print(f"note: took over the workspace lock left by pid {stale.get('pid')} ({stale.get('command')}), "
                      f"which is no longer running; removed {len(removed)} temporary file(s) it left", file=sys.stderr)
            yield

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
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def rows_to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=schema)
