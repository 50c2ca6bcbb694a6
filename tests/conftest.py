"""Shared fixtures. Tests use a model cache inside the repository (.cache/models) unless CURATE_MODELS is
set, so a fresh clone converts SmolLM2 once and later runs reuse it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CURATE_MODELS", str(REPO / ".cache" / "models"))


# ---- two workers (make test: pytest -n 2 --dist loadfile) -----------------------------------------------------
# A module is one unit of work, so its module-scoped engines open once and the session's servers start in one
# worker (the tests that use them live in test_served.py). Modules run longest first (as measured by --durations
# on a 2-core AMD EPYC), so the run does not end on one long module while the other worker idles, with one
# exception for memory: test_score_real (five models open at its peak) comes after test_ray and test_crash, so it
# does not run beside test_served's three servers and engines (together they took 20.1 of 24 GB, measured).
#
# Each worker's torch (and every command a test starts, which inherits this environment) gets its share of the
# cores: two workers at torch's default of one thread per core oversubscribe two cores, and OpenMP's spinning
# threads then slow both (measured on a 2-core AMD EPYC, two transformers scorings side by side: 54 s each at
# two threads, 42 s at one). A value the user set is kept.
#
# In-process vLLM engines get a 1 GiB KV cache (curate's default is 2): the tiny models' and SmolLM2's test runs
# use a few MiB of it, and with two workers, each with up to three engines open, beside three `vllm serve`
# processes, 2 GiB each did not fit in 24 GiB (the kernel killed a worker).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
LONGEST_FIRST = ["test_served.py", "test_ray.py", "test_crash.py", "test_score_real.py", "test_loaders.py", "test_generate.py",
                 "test_study.py", "test_quiet.py", "test_export.py", "test_parity.py", "test_repair.py", "test_train.py",
                 "test_probe.py", "test_plant.py", "test_methods.py", "test_wheel.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings/bytes (written as they are, for bad-input tests)."""
    with open(path, "wb") as handle:
        for row in rows:
            if isinstance(row, bytes):
                handle.write(row + b"\n")
            elif isinstance(row, str):
                handle.write(row.encode("utf-8") + b"\n")
            else:
                handle.write(json.dumps(row).encode("utf-8") + b"\n")
    return path


@pytest.fixture
def workspace(tmp_path: Path):
    from curate.store.workspace import Workspace

    return Workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from curate.models import registry

    return registry.pull("smollm2")


# ---- the real SmolLM2 and GSM8K, shared by every test that loads them ------------------------------------

SUBSET = "example_id < '03'"  # 19 GSM8K examples, ~4,500 chat tokens: enough to compare, quick on 2 cores


@pytest.fixture(scope="session")
def gsm8k_workspace(tmp_path_factory: pytest.TempPathFactory):
    from curate.stages.ingest import ingest
    from curate.store.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("gsm8k"))
    ingest(["gsm8k"], workspace=ws, progress=False)
    return ws


@pytest.fixture(scope="session")
def base(gsm8k_workspace):
    """The session's ingested GSM8K, for the tests that copy tables out of it (test_crash, test_ray)."""
    return gsm8k_workspace


def wait_for_parts(ws, process, table: str, count: int, timeout: float = 600.0) -> int:
    """Wait until a command running in ``process`` has written ``count`` parts of ``table`` to ``ws`` (a test
    that kills it mid-run then knows it is past start-up); fails if the command ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        written = len(ws.parts(table))
        if written >= count:
            return written
        if process.poll() is not None:
            errors = process.stderr.read()[-3000:] if process.stderr else ""
            raise AssertionError(f"the run ended before writing {count} parts of {table}: {errors}")
        time.sleep(0.02)
    raise AssertionError(f"no {count} parts of {table} after {timeout:.0f} s")


@pytest.fixture
def fresh(gsm8k_workspace, tmp_path: Path):
    """A workspace holding only the ingested GSM8K examples (tables from other tests do not leak in)."""
    import shutil

    from curate.store.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    shutil.copytree(gsm8k_workspace.table_dir("examples"), ws.table_dir("examples"))
    return ws


@pytest.fixture(scope="session")
def reference(smollm2_dir: Path):
    """The transformers scorer: the reference every vLLM result is checked against."""
    from curate.models.scorer import open_scorer

    return open_scorer(str(smollm2_dir), engine="transformers", dtype="float32", top_k=5)


def closed_after_use(opened):
    """Yield an engine and shut it down after the module (or session) that used it: engines do not pile up in
    one process."""
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def vllm_scorer(smollm2_dir: Path):
    """A float32 vLLM pooling engine, opened once per module that uses it (start-up takes ~15-30 s on 2 cores).
    Not per session: closing any other in-process engine tears down vLLM's process-wide parallel state, and an
    engine kept open across modules then fails ("pipeline model parallel group is not initialized")."""
    pytest.importorskip("vllm")
    from curate.models.scorer import open_scorer

    yield from closed_after_use(open_scorer(str(smollm2_dir), engine="vllm", dtype="float32", top_k=5))


@pytest.fixture(scope="module")
def vllm_bf16_scorer(smollm2_dir: Path):
    """The vLLM engine in bfloat16 (the default precision on a CPU with native bf16)."""
    pytest.importorskip("vllm")
    from curate.models.scorer import open_scorer

    yield from closed_after_use(open_scorer(str(smollm2_dir), engine="vllm", dtype="bfloat16", top_k=5))


def smollm2_teacher(smollm2_dir: Path):
    """A vLLM generation engine of SmolLM2 (float32: greedy traces are compared with transformers' generate)."""
    pytest.importorskip("vllm")
    from curate.models.teacher import open_teacher

    return open_teacher(str(smollm2_dir), dtype="float32", max_len=2048)


@pytest.fixture(scope="module")
def teacher(smollm2_dir: Path):
    """smollm2_teacher, per module: kept for the session it would stay open beside test_score_real's three engines
    (memory, not time, binds)."""
    yield from closed_after_use(smollm2_teacher(smollm2_dir))


def copy_workspace(ws, target: Path):
    """A writable copy of a shared workspace."""
    import shutil

    from curate.store.workspace import Workspace

    shutil.copytree(ws.root, target, ignore=shutil.ignore_patterns(".curate"))
    return Workspace(target)


@pytest.fixture(scope="session")
def scored_subset(gsm8k_workspace, reference, tmp_path_factory: pytest.TempPathFactory):
    """SUBSET scored once per test run under the transformers reference: tests that only read scores share it
    (copy it before writing). No IFD here: its second pass would double the slowest scoring of the run (SmolLM2 in
    transformers on one thread); test_score_real checks IFD on the vLLM engine's rows."""
    import shutil

    from curate.stages.score import score
    from curate.store.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("scored") / "ws")
    ws.root.mkdir()
    shutil.copytree(gsm8k_workspace.table_dir("examples"), ws.table_dir("examples"))
    score(ws, reference, where=SUBSET, progress=False)
    return ws


# ---- a tiny randomly initialised model with the real SmolLM2 tokenizer (fast tests) --------------------------


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (with its chat template) without converting its weights: the fast tier needs only
    this. Taken from the converted model when it is there, else read from the GGUF once and kept."""
    from curate.models import registry
    from curate.kernel.atomic import staged_directory

    converted = registry.cache_dir() / "smollm2"
    if (converted / "tokenizer.json").is_file():
        return converted
    import fcntl

    kept = REPO / ".cache" / "tokenizers" / "smollm2"
    kept.parent.mkdir(parents=True, exist_ok=True)
    with open(kept.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other test worker, on a fresh clone, waits for the first one's copy
        if not (kept / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            from curate.models.bundled import smollm2_gguf

            gguf = smollm2_gguf()
            with staged_directory(kept) as staging:
                AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    return kept


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's architecture cut to 2 layers, hidden 128, 2 heads of 64 (6.6M params; vLLM's CPU attention
    refuses head_dim 16), seeded, saved as a normal checkpoint with the real tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rms_norm_eps=9.999999747378752e-06,
                         rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=0, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).save_pretrained(target)
    return target


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---- one vLLM server and one Ray cluster for the whole session (each takes a minute to start on 2 cores) -----


def command_env() -> dict[str, str]:
    """The environment of a command a test runs in its own process: this checkout's code, the engine in the
    calling process, no progress bars, the session's 1 GiB KV cache per engine (above; the default 2 GiB each
    only crowds two replicas and a driver on a small machine)."""
    return {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TQDM_DISABLE": "1",
            "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}  # the session's test cluster (ray_cluster) has none


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served_smollm2(smollm2_dir: Path):
    """A real `vllm serve` of the bundled SmolLM2 (float32, as the in-process reference runs) on 127.0.0.1,
    started once for every test that talks to a server; its URL."""
    pytest.importorskip("vllm")
    from curate.models.served import local_server

    with local_server(smollm2_dir, name="smollm2") as url:
        yield url


@pytest.fixture(scope="session")
def served_smollm2_pooling(smollm2_dir: Path):
    """A real `vllm serve --runner pooling` of the bundled SmolLM2 (float32), started once for the tests that
    need hidden states over HTTP; its URL (served model name: smollm2)."""
    pytest.importorskip("vllm")
    from curate.models.served import POOLING_ARGS, local_server

    with local_server(smollm2_dir, *POOLING_ARGS, name="smollm2") as url:
        yield url


class RayCluster(NamedTuple):
    address: str  # for --ray ADDRESS
    group: int  # the process group of `ray start` and the services it starts (workers have groups of their own)
    raylet: int  # the pid of its raylet, which starts every worker

    def workers(self, title: str) -> list[int]:
        """The pids of this cluster's workers whose process title holds ``title`` (another cluster's are not
        its: they descend from another raylet)."""
        import subprocess

        listed = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in listed if _descends_from(int(pid), self.raylet)]


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent's pid
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray cluster (`ray start --head` with this machine's CPUs, as ``--ray`` alone starts one) that
    every ``--ray`` command of the session joins. Its own ports, so it stays apart from any other cluster on
    the machine; its processes are one process group, stopped at the end."""
    pytest.importorskip("ray.data")
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "ray-start.log"
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(port), "--num-cpus", str(os.cpu_count()), "--include-dashboard", "false",
               "--disable-usage-stats", "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
    # no memory monitor: Ray would kill replicas when other processes fill the machine (the kernel still would);
    # no token authentication (a cluster on 127.0.0.1 for this session): with ~/.ray/auth_token present (a plain
    # ray.init() writes one) `ray start` turns it on and the drivers, which run with command_env(), would not
    # send the token
    env = {**command_env(), "RAY_memory_monitor_refresh_ms": "0"}
    with open(log, "w") as output:
        head = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start exited with {head.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not come up in 300 s: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        raylet = subprocess.run(["pgrep", "-g", str(head.pid), "-f", "raylet/raylet"], capture_output=True, text=True).stdout.split()
        assert len(raylet) == 1, f"not one raylet in the cluster's process group: {raylet}"
        yield RayCluster(f"127.0.0.1:{port}", head.pid, int(raylet[0]))
    finally:
        # a short grace: `ray start --block` takes 30 s to end on SIGTERM alone, and nothing in a test cluster
        # needs saving (the raylet's workers end when it does)
        for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
                head.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # what outlived `ray start` (the raylet's workers) is in its process group too
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # `ray start` wrote its address where a plain `--ray` (a new local cluster) looks for one to join, as
        # `ray stop` would, take it back (while the session runs, the tests pass the address explicitly)
        address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if address_file.is_file() and address_file.read_text().strip().endswith(f":{port}"):
            address_file.unlink()
