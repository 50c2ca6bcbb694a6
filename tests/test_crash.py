"""kill -9 at a random moment of each stage, then a re-run: the workspace equals an uninterrupted run's (same
rows, no duplicates, nothing half-written read); and two writers started together: one refuses.

Each stage runs as the real command in its own process, on a tiny random model (the transformers engine;
vLLM for the teacher). The moment of the kill is drawn uniformly over the uninterrupted run's duration
(seeded by CURATE_CRASH_SEED, printed on failure)."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, command_env, write_jsonl
from curate.cli import main
from curate.store.verify import GRAINS, verify
from curate.store.workspace import Workspace

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("CURATE_CRASH_SEED", random.randrange(1 << 30)))
RNG = random.Random(SEED)
SUBSET = "example_id < '0c'"  # ~60 GSM8K problems


_env = command_env


def _command(program: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", f"{program}.cli", *args]


def run(program: str, args: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(_command(program, args), env=_env(), capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - started


def kill_at_random(program: str, args: list[str], duration: float) -> float:
    """Start the command, SIGKILL it at a uniform random moment of its expected duration."""
    moment = RNG.uniform(0.0, duration)
    process = subprocess.Popen(_command(program, args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    time.sleep(moment)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return moment


def rows(ws: Workspace, table: str) -> list[tuple]:
    parts = ws.parts(table)
    if not parts:
        return []
    data = pq.read_table([str(p) for p in parts]).to_pylist()
    grain = GRAINS.get(table, ("example_id",))
    return sorted((tuple(r[c] for c in grain), _rounded(r)) for r in data)


def _rounded(row: dict) -> tuple:
    """A row's values, floats as ``Close`` (equal within 5e-5: half a unit of the 4th decimal): a resumed run, or
    a replica with another thread count, batches its sums differently, so the last bits may differ. Rounding to
    4 decimals meant the same, but turns a 1e-7 difference into a 1e-4 one when a value sits on a boundary."""
    def value(v):
        if isinstance(v, float):
            return Close(v)
        if isinstance(v, list):
            return tuple(value(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, value(x)) for k, x in v.items()))
        return v
    return tuple(sorted((k, value(v)) for k, v in row.items()))


class Close(float):
    """A float that equals another within 5e-5, or 5e-5 of its size (NaN equals NaN: an unscored position is the
    same in both runs). Relative for large values: a perplexity is exp(mean NLL), so a 1e-8 difference in the mean
    NLL of a random model (ppl ~48,000) is a 5e-4 one in its ppl."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, float):
            return NotImplemented
        return (math.isnan(self) and math.isnan(other)) or math.isclose(self, other, rel_tol=5e-5, abs_tol=5e-5)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = float.__hash__


def same_workspaces(a: Workspace, b: Workspace, tables: list[str]) -> None:
    for table in tables:
        left, right = rows(a, table), rows(b, table)
        assert right, f"{table}: the uninterrupted run wrote nothing: the test would prove nothing"
        assert [k for k, _ in left] == [k for k, _ in right], f"{table}: different rows (seed {SEED})"
        assert len({k for k, _ in left}) == len(left), f"{table}: duplicates (seed {SEED})"
        assert left == right, f"{table}: different values (seed {SEED})"
    report = verify(a)
    assert report.ok, report.summary()


def crash_and_resume(program: str, make_args, tables: list[str], tmp_path: Path, setup=None) -> None:
    """An uninterrupted run, then a killed run re-run to the end, in two workspaces from the same start."""
    straight, crashed = Workspace(tmp_path / "straight"), Workspace(tmp_path / "crashed")
    for ws in (straight, crashed):
        if setup:
            setup(ws)
    duration = run(program, make_args(straight))
    moment = kill_at_random(program, make_args(crashed), duration)
    run(program, make_args(crashed))
    print(f"killed at {moment:.1f} s of {duration:.1f} s (seed {SEED})")
    same_workspaces(crashed, straight, tables)


def copy_of(base: Workspace, *tables: str):
    def setup(ws: Workspace) -> None:
        for table in ("examples", *tables):
            shutil.copytree(base.table_dir(table), ws.table_dir(table))
    return setup


def test_ingest(tmp_path: Path) -> None:
    rows_in = [{"prompt": f"Question {i}?", "completion": f"Answer {i}. #### {i}"} for i in range(120_000)] + ["{broken"]
    source = write_jsonl(tmp_path / "big.jsonl", rows_in)
    crash_and_resume("curate", lambda ws: ["ingest", str(source), "-w", str(ws.root), "--extract-answer", "hash", "--quiet"],
                     ["examples", "rejects"], tmp_path)


def test_score(base: Workspace, tiny_model_dir: Path, tmp_path: Path) -> None:
    crash_and_resume("curate", lambda ws: ["score", "-w", str(ws.root), "--model", str(tiny_model_dir), "--engine", "transformers",
                                           "--dtype", "float32", "--where", SUBSET, "--shard-size", "8", "--ifd", "--quiet"],
                     ["token_scores", "sample_scores"], tmp_path, copy_of(base))


def test_probe(base: Workspace, tiny_model_dir: Path, tmp_path: Path) -> None:
    crash_and_resume("curate", lambda ws: ["probe", "-w", str(ws.root), "--model", str(tiny_model_dir), "--engine", "transformers",
                                           "--dtype", "float32", "--where", SUBSET, "--shard-size", "8", "--quiet"],
                     ["probe_scores"], tmp_path, copy_of(base))


def test_generate(base: Workspace, tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    straight, crashed = Workspace(tmp_path / "straight"), Workspace(tmp_path / "crashed")
    for ws in (straight, crashed):
        copy_of(base)(ws)
    args = lambda ws: ["generate", "-w", str(ws.root), "--teacher", str(tiny_model_dir), "--dtype", "float32",  # noqa: E731
                       "--from", "example_id < '05'", "--n", "2", "--temperature", "0.8",
                       "--max-tokens", "16", "--batch-size", "6", "--quiet"]
    duration = run("curate", args(straight))
    kill_at_random("curate", args(crashed), duration)
    run("curate", args(crashed))
    # a resumed run batches requests differently, and vLLM's CPU kernels may then sample other tokens: the
    # requests (trace ids) must be the same, each exactly once; their texts are not compared
    straight_ids = [k for k, _ in rows(straight, "traces")]
    assert straight_ids and [k for k, _ in rows(crashed, "traces")] == straight_ids
    assert verify(crashed).ok


def _scored(base: Workspace, model: Path):
    """The scores select reads, made by the same command in this process (a setup, not a crash: no process of
    its own to start, import torch in and time)."""
    def setup(ws: Workspace) -> None:
        copy_of(base)(ws)
        assert main(["score", "-w", str(ws.root), "--model", str(model), "--engine", "transformers", "--dtype", "float32",
                     "--where", "example_id < '10'", "--quiet"]) == 0
    return setup


def test_select_and_export(base: Workspace, tiny_model_dir: Path, tmp_path: Path) -> None:
    straight, crashed = Workspace(tmp_path / "straight"), Workspace(tmp_path / "crashed")
    setup = _scored(base, tiny_model_dir)
    setup(straight)
    shutil.copytree(straight.root, crashed.root)
    select = lambda ws: ["select", "ppl_band", "-w", str(ws.root), "--param", f"score_key={tiny_model_dir}",  # noqa: E731
                         "--param", "fraction=0.5", "--param", "split=heldout", "--name", "band"]
    export = lambda ws: ["export", "band", "-w", str(ws.root), "--format", "axolotl", "--model", str(tiny_model_dir)]  # noqa: E731
    for args in (select, export):
        duration = run("curate", args(straight))
        kill_at_random("curate", args(crashed), duration)
        run("curate", args(crashed))
    same_workspaces(crashed, straight, ["selections/band"])
    exported = [pq.read_table(ws.root / "exports" / "band" / "axolotl" / "train.parquet").to_pylist() for ws in (crashed, straight)]
    assert exported[0] == exported[1]


def test_calibrate(base: Workspace, tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    args = lambda out: ["calibrate", "--data", str(base.table_dir("examples")), "--split", "pool", "--model",  # noqa: E731
                        str(tiny_model_dir), "--fraction", "0.03", "--max-steps", "4", "--max-len", "192",
                        "--precision", "float32", "--out", str(out), "--quiet"]
    duration = run("train", args(tmp_path / "straight"))
    kill_at_random("train", args(tmp_path / "crashed"), duration)
    crashed = tmp_path / "crashed"
    assert not crashed.exists() or (crashed / "train_config.json").is_file()  # never a half checkpoint
    run("train", args(crashed))
    a, b = (load_file(str(folder / "model.safetensors")) for folder in (crashed, tmp_path / "straight"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".crashed")]  # the killed run's staging folder is gone


def test_two_writers_started_together(base: Workspace, tiny_model_dir: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    copy_of(base)(ws)
    args = ["score", "-w", str(ws.root), "--model", str(tiny_model_dir), "--engine", "transformers", "--dtype", "float32",
            "--where", "example_id < '10'", "--quiet"]
    processes = [subprocess.Popen(_command("curate", args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=REPO) for _ in range(2)]
    outcomes = sorted((p.wait(), p.stderr.read()) for p in processes)
    assert [code for code, _ in outcomes] == [0, 3], outcomes
    assert "is being written by pid" in outcomes[1][1]
    keys = [k for k, _ in rows(ws, "token_scores")]
    assert keys and len(keys) == len(set(keys))
