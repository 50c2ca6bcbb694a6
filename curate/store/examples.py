"""Streaming examples out of the workspace in shards, and the resume bookkeeping every model stage shares.

A stage (score, probe, generate) walks the examples a SQL filter picks, in id order, a shard at a time
(memory does not grow with the table), and skips the ids whose rows already exist under its run key.
A filter is a predicate on ``examples`` (``split = 'pool'``) or a whole query that returns ``example_id``
(``select example_id from examples where split = 'pool' limit 4``); it is checked against the workspace
before any model loads.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq

from curate.store.sql import connect
from curate.store.workspace import Workspace

_QUERY = re.compile(r"^\s*\(?\s*(select|with|from|values)\b", re.IGNORECASE)
# characters of the messages of an example: a token estimate for progress bars before tokenizing
MESSAGE_CHARS = "list_sum(list_transform(messages, lambda m: length(m.content)))"


def done_ids(workspace: Workspace, table: str, key_column: str, key: str, *, id_column: str = "example_id",
             where: Sequence[tuple[str, str, Any]] = ()) -> set[str]:
    """The ids that already have rows in ``table`` under ``key`` (a run's identity) and the extra filters."""
    parts = workspace.parts(table)
    if not parts:
        return set()
    filters = [(key_column, "=", key), *where]
    done = pq.read_table([str(p) for p in parts], columns=[id_column], filters=filters)
    return set(done.column(id_column).to_pylist())


class Predicate(str):
    """A predicate on ``examples`` that was checked against the workspace, with what the user wrote
    (``source``): passed down from the command to the stage, it is not checked again."""

    source: str

    def __new__(cls, predicate: str, source: str) -> "Predicate":
        made = super().__new__(cls, predicate)
        made.source = source
        return made


def described(where: str | None) -> str | None:
    """What the user wrote for a filter (for run records), whether or not it was checked already."""
    return where.source if isinstance(where, Predicate) else where


def example_predicate(workspace: Workspace, text: str | None, *, option: str = "--where",
                      connection: Any = None) -> Predicate | None:
    """A predicate on ``examples`` from what a user wrote: a predicate, or a whole query returning example_id.

    Checked against the workspace now (cheap; before any model loads): a bad filter is an error that says
    what was wrong and what is accepted. A ``Predicate`` (checked already) comes back as it is."""
    import duckdb

    if isinstance(text, Predicate):
        return text
    if not workspace.has_table("examples"):
        raise FileNotFoundError(f"{workspace.root} has no examples; run `curate ingest ... --workspace {workspace.root}` first")
    if text is None or not text.strip():
        return None
    stripped = text.strip().rstrip(";").strip()
    predicate = f"example_id in (select example_id from ({stripped}))" if _QUERY.match(stripped) else f"({stripped})"
    try:
        (connection or connect(workspace)).execute(f"select count(*) from examples where {predicate}").fetchall()
    except duckdb.Error as err:
        reason = str(err).splitlines()[0]
        raise ValueError(
            f"{option} {text!r} is not usable SQL over the workspace ({reason}). Give a predicate on the examples "
            f"table, e.g. {option} \"split = 'pool'\", or a whole query that returns example_id, e.g. "
            f"{option} \"select example_id from examples where split = 'pool' limit 4\""
        ) from err
    return Predicate(predicate, text)


def examples_query(predicate: str | None, columns: Sequence[str]) -> str:
    return f"select {', '.join(columns)} from examples" + (f" where {predicate}" if predicate else "") + " order by example_id"


def pending_examples(workspace: Workspace, predicate: str | None, done: set[str], *,
                     connection: Any = None) -> list[tuple[str, int]]:
    """(example id, characters of its messages) for every picked example not done yet, in id order."""
    rows = (connection or connect(workspace)).execute(examples_query(predicate, ["example_id", MESSAGE_CHARS])).fetchall()
    return [(i, chars or 0) for i, chars in rows if i not in done]


def example_batches(workspace: Workspace, predicate: str | None, shard_size: int, columns: Sequence[str] = ("example_id", "messages"),
                    *, skip: set[str] | frozenset[str] = frozenset(), connection: Any = None) -> Iterator[Any]:
    """The picked examples in id order as Arrow record batches of ``shard_size`` rows, streamed from DuckDB,
    less the ids in ``skip`` (the batches keep their size)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    reader = (connection or connect(workspace)).sql(examples_query(predicate, columns)).to_arrow_reader(shard_size)
    for batch in reader:
        if skip:
            batch = batch.filter(pc.invert(pc.is_in(batch.column("example_id"), value_set=pa.array(sorted(skip), pa.string()))))
        if batch.num_rows:
            yield batch


class TokenProgress:
    """A progress bar in tokens that moves as each engine batch finishes, with rate and ETA.

    The total is estimated before tokenizing (characters of the pending messages, at the tokens per
    character measured so far, 0.3 until anything is measured) and refined as shards are tokenized."""

    def __init__(self, label: str, *, characters: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.characters_left = characters
        self.tokens_known = 0
        self.characters_known = 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=max(int(characters * 0.3), 1), desc=label, unit=" tok", unit_scale=True,
                        disable=not enabled, file=sys.stderr, smoothing=0.1)

    def tokenized(self, tokens: int, characters: int) -> None:
        """A shard was tokenized: its exact token count replaces its estimate."""
        self.tokens_known += tokens
        self.characters_known += characters
        self.characters_left = max(self.characters_left - characters, 0)
        ratio = self.tokens_known / max(self.characters_known, 1)
        self.bar.total = max(self.tokens_known + int(self.characters_left * ratio), self.bar.n, 1)
        self.bar.refresh()

    def done(self, tokens: int) -> None:
        self.bar.update(tokens)

    def close(self) -> None:
        self.bar.close()
