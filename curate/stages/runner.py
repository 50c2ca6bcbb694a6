"""The one runner every model stage (score, probe, generate) runs on: a stage is the small part that turns a
shard of example rows into its tables' rows; the runner owns everything around it.

Under the workspace's writer lock and a run record (``runs``, written when the run starts and ends), the
runner picks the examples (the checked predicate, one DuckDB connection for the whole run), lets the stage
say which are finished and how a shard becomes rows (``Plan``), sends the pending shards through that work
in this process or on Ray's replicas (``curate.stages.shards``), writes each shard's rows as one atomic
Parquet part per table, adds the shard's counts to the report and moves the progress bar, then lets the
stage finish (aggregates, summaries), writes the manifest, and checks the tables it wrote (``verify``).
A run killed at any moment leaves only whole parts; the next run skips what they hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from curate.kernel.runs import recorded_run
from curate.stages.shards import (
    Job,
    RaySettings,
    ShardWork,
    merge_counts,
    shard_outputs,
)
from curate.store import schema
from curate.store.examples import pending_examples
from curate.store.sql import connect
from curate.store.verify import check_tables
from curate.store.workspace import Workspace


class Progress(Protocol):
    """How a stage's progress shows: told of every finished shard (its counts and the report so far)."""

    def shard(self, counts: dict[str, Any], report: Any) -> None: ...

    def close(self) -> None: ...


@dataclass
class CountProgress:
    """A tqdm bar that moves by one of a shard's counts (examples, requests), with an optional postfix."""

    bar: Any
    counter: str
    postfix: Callable[[Any], str] | None = None

    def shard(self, counts: dict[str, Any], report: Any) -> None:
        self.bar.update(counts[self.counter])
        if self.postfix is not None:
            self.bar.set_postfix_str(self.postfix(report))

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class StageRun:
    """One run of a model stage, as the runner needs to know it."""

    stage: str  # its name in the run registry and the manifest: score, pair, probe, generate
    key: str
    models: list[str]  # every name the run's models go by (readable references find it by any)
    parameters: dict[str, Any]  # recorded in the run registry and the manifest
    fingerprints: dict[str, str]
    tables: tuple[str, ...]  # the tables it writes, checked when it ends
    columns: tuple[str, ...]  # the example columns a shard carries
    shard_size: int


@dataclass
class Plan:
    """What a stage decides under the lock, knowing the picked examples: which are finished (left out of the
    shards), how a shard becomes rows here (``work``) or on Ray's replicas (``job``), how progress shows."""

    skip: set[str]
    progress: Progress
    work: ShardWork | None = None
    job: Job | None = None
    manifest: dict[str, Any] = field(default_factory=dict)  # what the manifest adds to the run's parameters


Planner = Callable[[Any, list[tuple[str, int]]], Plan]  # (the run's DuckDB connection, picked (id, characters)) -> Plan


def run_stage(workspace: Workspace, run: StageRun, report: Any, *, predicate: str | None, plan: Planner,
              ray: RaySettings | None = None, finish: Callable[[Any], None] | None = None) -> Any:
    """Run ``run`` over the examples ``predicate`` picks (already checked) and return ``report`` filled in.
    ``finish(connection)`` runs after the last shard, under the lock (the connection sees the new tables)."""
    with workspace.writing(), recorded_run(workspace.root, run.stage, run.key, models=run.models, parameters=run.parameters,
                                           fingerprints=run.fingerprints) as record:
        con = connect(workspace)
        planned = plan(con, pending_examples(workspace, predicate, set(), connection=con))
        started = time.perf_counter()
        for outputs, counts in shard_outputs(workspace, predicate, run.shard_size, run.columns, skip=planned.skip,
                                             work=planned.work, job=planned.job, ray=ray, connection=con):
            for table, rows in outputs:
                workspace.write_part(table, rows, schema=schema.TABLES[table])
            merge_counts(report, counts)
            planned.progress.shard(counts, report)
        planned.progress.close()
        report.seconds = time.perf_counter() - started
        if finish is not None:
            finish(connect(workspace, into=con))
        record.counts = vars(report)
        workspace.write_manifest(run.stage, {"key": run.key, **run.parameters, **planned.manifest, "report": vars(report)})
    check_tables(workspace, list(run.tables), connection=con)  # the run's one connection, its views made anew
    return report
