"""How a model stage's shards get done: in this process, or data-parallel on Ray Data
(``curate score|probe|generate ... --ray [ADDRESS] --replicas N``).

A stage turns a shard of example rows into its tables' rows with one function (a ``ShardWork``), the same
here and on every replica. The driver (the ``curate`` process) holds the workspace lock, decides what is
pending and writes every shard that comes back as one atomic Parquet part per table, under the run key, so
resume, ``curate verify`` and every recipe work the same whichever way the rows were made. On Ray, the pending
shards go from the driver into the object store (no shared disk needed) and through ``map_batches`` on an
actor pool: each replica opens its own engine once (one GPU each where the cluster has GPUs). A shard whose
replica died is run again on a restarted one (Ray restarts the actor and retries the task); a driver killed
outright leaves only whole parts, so a re-run finishes the rest.

``ray[data]`` is an optional extra: ``pip install curate-sft[ray]``.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from curate.kernel.logs import ENV, level, python_level, quiet_libraries, verbose
from curate.kernel.machine import resolve_precision
from curate.store.examples import example_batches
from curate.store.workspace import Workspace

RESTARTS = 3  # a replica that keeps dying (out of memory, a bad node) fails the run after this many restarts
Output = tuple[list[tuple[str, Any]], dict[str, Any]]  # ([(table name, Arrow table)], counts for the report)
ShardWork = Callable[[list[dict[str, Any]]], Output]


class Job(Protocol):
    """Everything a replica needs, picklable: ``open()`` opens the engine and returns the stage's ShardWork."""

    def open(self) -> ShardWork: ...


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide a data-parallel run goes, and how each replica opens its engine."""

    address: str | None  # None: a local cluster; "auto": the one `ray start` runs here; else an address
    replicas: int
    opener: dict[str, Any]  # the stage's open_scorer / open_teacher keyword arguments


def shard_outputs(workspace: Workspace, predicate: str | None, shard_size: int, columns: Sequence[str], *,
                  skip: set[str], work: ShardWork | None = None, job: Job | None = None,
                  ray: RaySettings | None = None, connection: Any = None) -> Iterator[Output]:
    """Every pending shard's outputs: ``work`` here, or ``job`` on ``ray``'s replicas (in whatever order
    they finish). ``skip``: the ids already done (left out of the shards)."""
    shards = example_batches(workspace, predicate, shard_size, columns, skip=skip, connection=connection)
    if ray is None:
        assert work is not None
        return (work(shard.to_pylist()) for shard in shards)
    assert job is not None
    return run(job, shards, address=ray.address, replicas=ray.replicas)


def check_replica_key(replica: str, driver: str) -> None:
    if replica != driver:
        raise RuntimeError(f"this replica's run key {replica} is not the driver's {driver}: the replicas opened another model, "
                           "precision or engine than the first worker did (check the model path and packages on every node)")


def merge_counts(report: Any, counts: dict[str, Any]) -> None:
    """Add a shard's counts to the report's fields of the same names (Counters by key)."""
    for name, value in counts.items():
        current = getattr(report, name, None)
        if isinstance(current, Counter):
            current.update(value)
        elif current is not None:
            setattr(report, name, current + value)


def require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:  # a LookupError: the command prints the message, not a traceback
        raise LookupError("--ray needs Ray Data, which is not installed: pip install 'curate-sft[ray]' "
                          "(or pip install 'ray[data]')") from None
    return ray


def connect(address: str | None) -> Any:
    """Join a cluster (``auto``: the one running on this machine, or an address) or start a local one."""
    ray = require_ray()
    if not ray.is_initialized():
        # Ray and its workers at curate's log level (curate.kernel.logs); a replica's own output reaches this
        # terminal only with --verbose (its errors come back with the task that failed, in full, either way)
        quiet_libraries()
        options = {"include_dashboard": False, "log_to_driver": verbose(), "ignore_reinit_error": True,
                   "logging_level": python_level()}
        if verbose():  # a cluster started elsewhere does not have this process's environment
            options["runtime_env"] = {"env_vars": {ENV: level()}}
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=os.cpu_count(), **options)
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # curate's own bar counts tokens
    context.print_on_execution_start = False
    context.issue_detectors_config.detectors = []  # its memory advice is about Ray's booking, not a fault
    logging.getLogger("ray.data").setLevel(python_level())
    return ray


def _replica_resources(ray: Any, replicas: int) -> dict[str, float]:
    """One GPU per replica where the cluster has GPUs; else an equal share of its CPUs (Ray gives an actor as
    many OpenMP threads as the CPUs it books)."""
    cluster = ray.cluster_resources()
    if cluster.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": max(1, int(cluster.get("CPU", 1)) // replicas)}


def on_worker(address: str | None, function: Any, *args: Any) -> Any:
    """``function(*args)`` on one worker of the cluster (with a GPU where there are GPUs); its return value."""
    ray = connect(address)
    resources = _replica_resources(ray, 1)
    return ray.get(ray.remote(max_retries=1, **resources)(function).remote(*args))


def _serialize(table: Any) -> bytes:
    import pyarrow as pa

    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _deserialize(blob: bytes) -> Any:
    import pyarrow as pa

    return pa.ipc.open_stream(blob).read_all()


class _Replica:
    """One engine on one worker: the actor Ray Data keeps for the pool."""

    def __init__(self, job: Job) -> None:
        self.process = job.open()

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        outputs, counts = self.process(batch.to_pylist())
        names = [name for name, _ in outputs] + ["__counts__"]
        blobs = [_serialize(table) for _, table in outputs] + [json.dumps(counts).encode()]
        return pa.table({"table": names, "blob": pa.array(blobs, pa.binary())})


def run(job: Job, shards: Iterable[Any], *, address: str | None, replicas: int) -> Iterator[Output]:
    """Run ``job`` over ``shards`` (Arrow batches of example rows, each the unit one replica takes and one
    written part holds) on ``replicas`` actors; yields each shard's outputs as it finishes, in any order."""
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    ray = connect(address)
    import pyarrow as pa

    refs = [ray.put(pa.Table.from_batches([shard])) for shard in shards]  # the driver's rows travel: no shared disk needed
    if not refs:
        return
    dataset = ray.data.from_arrow_refs(refs)
    with warnings.catch_warnings():
        # a bound on restarts has no named parameter yet (Ray Data's own default restarts forever): the extra
        # pins ray below 2.64, which drops these arguments
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        results = dataset.map_batches(
            _Replica, fn_constructor_args=(job,), batch_size=None, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(replicas, len(refs))), max_restarts=RESTARTS,
            max_task_retries=RESTARTS, **_replica_resources(ray, replicas))
    for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
        rows = batch.to_pylist()
        counts = next(json.loads(r["blob"]) for r in rows if r["table"] == "__counts__")
        yield [(r["table"], _deserialize(r["blob"])) for r in rows if r["table"] != "__counts__"], counts


def replica_precision(settings: RaySettings) -> str:
    """The precision the replicas will resolve ``settings.opener``'s dtype to: ``auto`` is resolved on one of
    the cluster's workers (one tiny task; a GPU node and this driver can differ), anything else is itself."""
    dtype = settings.opener.get("dtype", "auto")
    return dtype if dtype != "auto" else on_worker(settings.address, resolve_precision, dtype)
