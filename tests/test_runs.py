"""The run registry, readable references, one writer per workspace, and curate verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from curate.store import schema
from curate.cli import main
from curate.kernel.lock import WorkspaceBusy, writer_lock
from curate.kernel.runs import recorded_run
from curate.store.run_refs import ReferenceError, read_runs, resolve, runs_table
from curate.store.verify import IntegrityError, check_tables, verify
from curate.store.workspace import Workspace
from test_recipes import examples, put, samples


def _score_run(ws: Workspace, key: str, model: str, path: str, *, fail: bool = False) -> None:
    parameters = {"path": path, "models": [{"key": key, "model": model, "path": path}]}
    try:
        with recorded_run(ws.root, "score", key, models=[model, path, Path(path).name], parameters=parameters) as record:
            record.counts = {"examples_scored": 3}
            if fail:
                raise RuntimeError("engine died")
    except RuntimeError:
        pass


def test_runs_are_recorded_at_start_and_end(workspace: Workspace) -> None:
    with recorded_run(workspace.root, "score", "k1", models=["m"]) as record:
        (started,) = read_runs(workspace)
        assert started["status"] == "started" and started["finished_at"] is None and started["pid"] == os.getpid()
        record.counts = {"examples_scored": 7}
    (finished,) = read_runs(workspace)
    assert finished["status"] == "finished" and json.loads(finished["counts"]) == {"examples_scored": 7}
    assert finished["seconds"] >= 0 and "signals" in finished["code_version"]
    with pytest.raises(ValueError), recorded_run(workspace.root, "select", "k2"):
        raise ValueError("bad recipe")
    failed = [r for r in read_runs(workspace) if r["key"] == "k2"][0]
    assert failed["status"] == "failed" and "bad recipe" in failed["error"]
    table = runs_table(workspace)
    assert "finished" in table and "failed" in table and "examples_scored=7" in table


def test_a_model_reference_means_its_latest_finished_run(workspace: Workspace, tmp_path: Path) -> None:
    examples(workspace, ["e1"])
    checkpoint = tmp_path / "models" / "smollm2"
    checkpoint.mkdir(parents=True)
    _score_run(workspace, "aaaa000000000001", "smollm2", str(checkpoint))
    time.sleep(0.01)
    _score_run(workspace, "aaaa000000000002", "smollm2", str(checkpoint))
    _score_run(workspace, "aaaa000000000003", "smollm2", str(checkpoint), fail=True)  # failed runs never count
    assert resolve(workspace, "score_run", "smollm2") == "aaaa000000000002"
    assert resolve(workspace, "score_run", str(checkpoint)) == "aaaa000000000002"  # by path
    assert resolve(workspace, "score_run", "aaaa000000000001") == "aaaa000000000001"  # a key stays itself
    other = tmp_path / "elsewhere" / "smollm2"
    other.mkdir(parents=True)
    _score_run(workspace, "bbbb000000000001", "smollm2", str(other))
    with pytest.raises(ReferenceError, match="ambiguous: it matches runs of 2 models.*bbbb000000000001.*aaaa000000000002"):
        resolve(workspace, "score_run", "smollm2")
    assert resolve(workspace, "score_run", str(other)) == "bbbb000000000001"  # a path is unambiguous
    with pytest.raises(ReferenceError, match="no finished score run matches"):
        resolve(workspace, "score_run", "llama")


def test_recipe_parameters_keep_run_keys_as_text(workspace: Workspace) -> None:
    """A 16-hex key made only of digits, or with one 'e' (about 1 key in 800), used to become a number."""
    from curate.stages.recipes import load_recipe
    from curate.stages.select import select

    names = [f"e{i:02d}" for i in range(1, 5)]
    examples(workspace, names)
    for key in ("1234567890123456", "1234e56789012345"):
        samples(workspace, [(n, 0.1 * i, 1.0, 10) for i, n in enumerate(names, start=1)], key=key)
        report = select(workspace, load_recipe("ppl_band"), name="band", params={"score_key": key, "band": "max", "fraction": "0.5"})
        assert report.rows == 2
    with pytest.raises(ValueError, match="parameter fraction expects a number, got 'half'"):
        select(workspace, load_recipe("ppl_band"), name="band", params={"score_key": key, "fraction": "half"})


def test_a_recipe_header_declares_types(tmp_path: Path) -> None:
    from curate.stages.recipes import ParameterError, load_recipe

    path = tmp_path / "mine.sql"
    path.write_text("-- name: mine\n-- parameters:\n--   key (score_run): a run\n--   n (int) = 3: how many\n"
                    "--   share = 0.5: untyped, a float by its default\n--   flag (bool) = false: a switch\n"
                    "--   label = pool: untyped text\nselect $key as k, $n as n, $share as s, $flag as f, $label as l\n")
    recipe = load_recipe(path)
    assert {p.name: (p.kind, p.default) for p in recipe.parameters.values()} == {
        "key": ("score_run", None), "n": ("int", 3), "share": ("float", 0.5), "flag": ("bool", False), "label": ("text", "pool")}
    assert recipe.bind({"key": "0e12", "n": "7", "flag": "yes"}) == {"key": "0e12", "n": 7, "share": 0.5, "flag": True, "label": "pool"}
    with pytest.raises(ParameterError, match="parameter n expects an integer, got '7.5'"):
        recipe.bind({"key": "x", "n": "7.5"})
    path.write_text("-- name: bad\n-- parameters:\n--   n (integer) = 3: wrong type name\nselect 1\n")
    with pytest.raises(ParameterError, match=r"unknown type \(integer\)"):
        load_recipe(path)


def _hold_lock(root: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from curate.kernel.lock import writer_lock\n"
            "with writer_lock(Path(sys.argv[1]), command='curate score --model big'):\n"
            "    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_refuses_at_once_and_a_dead_holders_lock_is_taken_over(workspace: Workspace, capsys) -> None:
    workspace.root.mkdir(parents=True)
    holder = _hold_lock(workspace.root)
    started = time.perf_counter()
    with pytest.raises(WorkspaceBusy, match=rf"written by pid {holder.pid} .*curate score --model big"):
        with workspace.writing():
            pass
    assert time.perf_counter() - started < 1.0  # refuses at once, does not wait
    assert main(["ingest", "gsm8k", "-w", str(workspace.root), "--quiet"]) == 3
    assert f"pid {holder.pid}" in capsys.readouterr().err and not workspace.has_table("examples")
    assert verify(workspace).writer["pid"] == holder.pid  # readers see who writes, and never wait
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workspace.writing():  # the kernel released the dead holder's lock: taken over, and said so
        pass
    assert f"took over the workspace lock left by pid {holder.pid}" in capsys.readouterr().err
    with writer_lock(workspace.root), writer_lock(workspace.root):  # re-entrant within a process
        pass


def test_verify_finds_duplicates_orphans_temporaries_and_broken_parts(workspace: Workspace) -> None:
    examples(workspace, ["e1", "e2"])
    samples(workspace, [("e1", 0.1, 1.0, 5), ("e9", 0.2, 1.0, 5)])  # e9 is not an example
    samples(workspace, [("e1", 0.1, 1.0, 5)])  # e1 twice under one key
    report = verify(workspace)
    assert not report.ok
    assert "1 example_id/score_key value(s) on more than one row" in report.duplicates["sample_scores"][0]
    assert "example_id not in examples, e.g. e9" in report.orphans["sample_scores"][0]
    with pytest.raises(IntegrityError, match="sample_scores: 1 example_id/score_key"):
        check_tables(workspace, ["sample_scores"])
    stale = workspace.table_dir("examples") / ".part-x.parquet.tmp-99999-abcd1234"
    stale.write_bytes(b"half a file")
    (workspace.table_dir("examples") / "part-broken.parquet").write_bytes(b"not parquet")
    report = verify(workspace)
    assert report.temporaries == ["examples/.part-x.parquet.tmp-99999-abcd1234"]
    assert report.unreadable == ["examples/part-broken.parquet"]
    assert "stale" in report.summary()
    verify(workspace, clean=True)
    assert not stale.exists()


def test_curate_runs_and_verify_commands(workspace: Workspace, capsys) -> None:
    examples(workspace, ["e1"])
    put(workspace, "traces", [{"trace_id": "t1", "example_id": "e1", "gen_key": "g"}])
    _score_run(workspace, "cccc000000000001", "smollm2", "/models/smollm2")
    assert main(["runs", "-w", str(workspace.root)]) == 0
    out = capsys.readouterr().out
    assert "score" in out and "cccc000000000001" in out and "finished" in out
    assert main(["verify", "-w", str(workspace.root)]) == 0
    assert "workspace is whole" in capsys.readouterr().out
    workspace.write_part("traces", pa.Table.from_pylist([{"trace_id": "t1", "example_id": "e1"}], schema=schema.TRACES),
                         schema=schema.TRACES)
    assert main(["verify", "-w", str(workspace.root)]) == 1
    assert "duplicates: traces" in capsys.readouterr().out
