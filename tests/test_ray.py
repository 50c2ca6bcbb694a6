"""``curate score|probe|generate --ray``: Ray Data replicas on a local Ray cluster on this CPU, each with a
real vLLM engine (a tiny random model, fp32), against the single-process run of the same command. Every
command joins the session's one cluster (conftest's ``ray_cluster``) rather than starting its own.

The faults are real: the driver is killed with SIGKILL once some parts are written, and a replica's process
is killed with SIGKILL mid-run (Ray restarts the actor and runs its shard again)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, RayCluster, wait_for_parts
from test_crash import _command, _env, copy_of, same_workspaces
from curate.cli import main
from curate.stages.shards import require_ray
from curate.store.workspace import Workspace

pytestmark = pytest.mark.slow
pytest.importorskip("ray.data")
SUBSET = "example_id < '12'"  # ~95 GSM8K chats: ~24 parts of 4; the engines' start-up is most of a run
TABLES = ["token_scores", "sample_scores"]


def on_ray(cluster: RayCluster) -> tuple[str, ...]:
    """``--ray`` on the session's cluster with two replicas (one CPU each: the cluster has this machine's two)."""
    return ("--ray", cluster.address, "--replicas", "2")


def score_args(ws: Workspace, model: Path, *extra: str) -> list[str]:
    return ["score", "-w", str(ws.root), "--model", str(model), "--engine", "vllm", "--dtype", "float32", "--where", SUBSET,
            "--shard-size", "4", "--quiet", *extra]


def probe_args(ws: Workspace, model: Path, *extra: str) -> list[str]:
    return ["probe", "-w", str(ws.root), "--model", str(model), "--dtype", "float32", "--where", "example_id < '10'",
            "--shard-size", "16", "--quiet", *extra]


def generate_args(ws: Workspace, model: Path, *extra: str) -> list[str]:
    """Sampled (temperature 0.7, two per example): each request's own seed makes the replicas' traces the same."""
    return ["generate", "-w", str(ws.root), "--teacher", str(model), "--dtype", "float32", "--from", "example_id < '06'",
            "--n", "2", "--temperature", "0.7", "--max-tokens", "16", "--batch-size", "8", "--quiet", *extra]


@pytest.fixture(scope="module")
def straight(base: Workspace, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """The single-process runs every Ray run must equal: the same commands, run in this process."""
    ws = Workspace(tmp_path_factory.mktemp("straight") / "ws")
    copy_of(base)(ws)
    for args in (score_args, probe_args, generate_args):
        assert main(args(ws, tiny_model_dir)) == 0
    return ws


def _start(ws: Workspace, model: Path, cluster: RayCluster) -> subprocess.Popen:
    _no_replicas_left(cluster)
    return subprocess.Popen(_command("curate", score_args(ws, model, *on_ray(cluster))), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _replica_pids(cluster: RayCluster) -> list[int]:
    """The replica processes of the session's cluster (another cluster's on this machine are not ours)."""
    return cluster.workers("MapBatches\\(_Replica\\)")


def _no_replicas_left(cluster: RayCluster, timeout: float = 120.0) -> None:
    """Wait until the replicas of an earlier run are gone (Ray ends them once their driver has ended), so the
    replica a test kills is one of the run it watches."""
    deadline = time.monotonic() + timeout
    while _replica_pids(cluster):
        assert time.monotonic() < deadline, f"replicas of an earlier run alive after {timeout:.0f} s: {_replica_pids(cluster)}"
        time.sleep(0.2)


def _stop_driver(process: subprocess.Popen) -> None:
    """A SIGKILLed driver and whatever it started itself (its session); the cluster stays for the next test."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_two_replicas_write_the_rows_of_one_process(straight: Workspace, base: Workspace, tiny_model_dir: Path,
                                                    ray_cluster: RayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe and generate; score's two-replica rows are compared with the one-process run's by the fault tests. The
    drivers run in this process (the commands' own main: no process start and imports to pay twice); the replicas are
    the cluster's processes as always, and the fault test below runs its drivers as processes of their own."""
    ws = Workspace(tmp_path / "ray")
    copy_of(base)(ws)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the session's cluster has no token (conftest: ray_cluster)
    try:
        for args in (probe_args, generate_args):
            assert main(args(ws, tiny_model_dir, *on_ray(ray_cluster))) == 0
    finally:
        require_ray().shutdown()  # this process leaves the cluster: the next test's replicas are the only ones there
    same_workspaces(ws, straight, ["probe_scores", "traces", "best_traces"])


def test_a_killed_driver_is_finished_by_a_rerun_that_replaces_a_dead_replica(straight: Workspace, base: Workspace,
                                                                             tiny_model_dir: Path, ray_cluster: RayCluster,
                                                                             tmp_path: Path) -> None:
    """Both faults in one workspace (one Ray run fewer): the driver is killed once two parts are written; its re-run
    loses a replica once it has written a part of its own, and still ends with the rows of one process."""
    ws = Workspace(tmp_path / "ray")
    copy_of(base)(ws)
    total = len(straight.parts("token_scores"))
    process = _start(ws, tiny_model_dir, ray_cluster)
    try:
        wait_for_parts(ws, process, "token_scores", 2)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        _stop_driver(process)
    driver_killed_with = len(ws.parts("token_scores"))
    assert driver_killed_with < total, "the run finished before the driver was killed: the test proves nothing"

    rerun = _start(ws, tiny_model_dir, ray_cluster)
    try:
        wait_for_parts(ws, rerun, "token_scores", driver_killed_with + 1)
        victims = _replica_pids(ray_cluster)
        assert victims, "no replica process found to kill"
        os.kill(victims[0], signal.SIGKILL)
        replica_killed_with = len(ws.parts("token_scores"))
        _, errors = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, errors[-3000:]
    finally:
        _stop_driver(rerun)
    assert replica_killed_with < total, "the re-run finished before the replica was killed: the test proves nothing"
    print(f"driver killed with {driver_killed_with}, replica {victims[0]} with {replica_killed_with} of {total} parts written")
    same_workspaces(ws, straight, TABLES)
