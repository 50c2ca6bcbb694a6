"""Streaming examples out of the workspace in shards, and the resume bookkeeping every model stage shares.

A stage (score, probe, generate) walks the examples a SQL predicate picks, in id order, a shard at a time
(memory does not grow with the table), and skips the ids whose rows already exist under its run key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq

from curate.workspace import Workspace


def done_ids(workspace: Workspace, table: str, key_column: str, key: str, *, id_column: str = "example_id") -> set[str]:
    """The ids that already have rows in ``table`` under ``key`` (a run's identity)."""
    parts = workspace.parts(table)
    if not parts:
        return set()
    done = pq.read_table([str(p) for p in parts], columns=[id_column], filters=[(key_column, "=", key)])
    return set(done.column(id_column).to_pylist())


def examples_query(where: str | None, columns: Sequence[str]) -> str:
    return f"select {', '.join(columns)} from examples" + (f" where {where}" if where else "") + " order by example_id"


def count_pending(workspace: Workspace, where: str | None, done: set[str]) -> int:
    """How many picked examples are not done yet: the total of a stage's progress bar."""
    from curate.sql import connect

    ids = connect(workspace).execute(examples_query(where, ["example_id"])).fetchall()
    return sum(1 for (i,) in ids if i not in done)


def example_shards(
    workspace: Workspace, where: str | None, shard_size: int, columns: Sequence[str] = ("example_id", "messages")
) -> Iterator[list[dict[str, Any]]]:
    """Examples in id order, ``shard_size`` at a time, streamed from DuckDB."""
    from curate.sql import connect

    if not workspace.has_table("examples"):
        raise FileNotFoundError(f"{workspace.root} has no examples; run `curate ingest ... --workspace {workspace.root}` first")
    reader = connect(workspace).sql(examples_query(where, columns)).to_arrow_reader(shard_size)
    for batch in reader:
        if batch.num_rows:
            yield batch.to_pylist()


def run_key(parts: dict[str, Any]) -> str:
    """A short stable hash of a run's identity (model fingerprint, engine, parameters): rows carry it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
