"""The run registry: one row per stage run in ``WORKSPACE/runs/<run_id>.parquet``, written when the run
starts (status ``started``) and replaced when it ends (``finished`` or ``failed``, with counts and times).

Each run's file is its own, so writers never contend for it and a reader sees the whole row or the previous
one. A run killed outright stays ``started``; ``curate runs`` shows it as ``died`` once its process is gone.
``curate runs`` lists the table; ``curate.store.run_refs`` resolves readable references (a model alias or path) to
the key of that model's latest finished run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from curate.kernel.atomic import write_atomic
from curate.kernel.keys import canonical, code_version

RUNS_TABLE = "runs"
STATUSES = ("started", "finished", "failed")


def runs_schema():
    import pyarrow as pa

    return pa.schema([
        ("run_id", pa.string()),
        ("stage", pa.string()),  # ingest, score, pair, probe, generate, select, export, sft, calibrate
        ("key", pa.string()),  # the spec's hash: the key its rows carry (score_key, pair_key, ...)
        ("status", pa.string()),  # started, finished, failed
        ("models", pa.list_(pa.string())),  # names a reference may use: the alias given, resolved path, folder name
        ("parameters", pa.string()),  # JSON: the spec and the options that chose which rows to make
        ("fingerprints", pa.string()),  # JSON: model / tokenizer / input table fingerprints
        ("code_version", pa.string()),
        ("counts", pa.string()),  # JSON: the stage's report
        ("error", pa.string()),
        ("command", pa.string()),
        ("pid", pa.int64()),
        ("host", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("seconds", pa.float64()),
    ])


def model_names(given: str, path: str | None = None) -> list[str]:
    """Every name a user may later use for a model: as given, its resolved path, and the folder's name."""
    names = [given]
    if path:
        names += [str(Path(path)), Path(path).name]
    return list(dict.fromkeys(n for n in names if n))


@dataclass
class RunRecord:
    root: Path
    stage: str
    key: str
    models: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    status: str = "started"
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def __post_init__(self) -> None:
        if not self.run_id:
            stamp = dt.datetime.fromtimestamp(self.started, dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
            self.run_id = f"{self.stage}-{stamp}-{uuid.uuid4().hex[:8]}"

    def write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def stamp(seconds: float | None):
            return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc)

        row = {
            "run_id": self.run_id, "stage": self.stage, "key": self.key, "status": self.status, "models": self.models,
            "parameters": json.dumps(canonical(self.parameters), sort_keys=True, default=str),
            "fingerprints": json.dumps(canonical(self.fingerprints), sort_keys=True, default=str),
            "code_version": code_version(), "counts": json.dumps(canonical(self.counts), sort_keys=True, default=str),
            "error": self.error, "command": shlex.join(sys.argv), "pid": os.getpid(), "host": socket.gethostname(),
            "started_at": stamp(self.started), "finished_at": stamp(self.finished),
            "seconds": None if self.finished is None else self.finished - self.started,
        }
        folder = self.root / RUNS_TABLE
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([row], schema=runs_schema())
        write_atomic(folder / f"{self.run_id}.parquet", lambda tmp: pq.write_table(table, tmp))

    def end(self, status: str, error: str | None = None) -> None:
        self.status, self.error, self.finished = status, error, time.time()
        self.write()


@contextlib.contextmanager
def recorded_run(root: Path, stage: str, key: str, **details: Any) -> Iterator[RunRecord]:
    """Record a run around the block: ``started`` now, then ``finished`` (or ``failed`` with the error, if the
    block raises). The block fills ``record.counts``."""
    record = RunRecord(Path(root), stage, key, **details)
    record.write()
    try:
        yield record
    except BaseException as err:
        record.end("failed", f"{type(err).__name__}: {err}"[:2000])
        raise
    record.end("finished")
