"""curate verify --repair: a part of every table truncated (a disk error, an interrupted copy), every command that
meets one says to repair (never a raw "magic bytes" error), the repair moves the damaged parts into the
quarantine and prints the re-runs that restore them, and those re-runs give back the untouched workspace."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from curate.cli import main
from curate.store.verify import QUARANTINE, verify
from curate.store.workspace import Workspace
from test_crash import rows
from test_refs_needs import _other_model

pytestmark = pytest.mark.slow

CHATS = [{"prompt": f"Ann has {i} pens and finds {i % 5 + 1} more. How many pens does she have?",
          "completion": f"She has {i} + {i % 5 + 1} = {i + i % 5 + 1} pens.\n#### {i + i % 5 + 1}"} for i in range(48)]
MODEL = ["--engine", "transformers", "--dtype", "float32", "--shard-size", "8", "--quiet"]
TABLES = ("examples", "rejects", "token_scores", "sample_scores", "pair_scores", "probe_scores", "selections/band", "traces",
          "best_traces", "runs")


def curate(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> int:
    """A command run in this process, recorded as a user's command line (the repair reads it back)."""
    monkeypatch.setattr(sys, "argv", ["curate", *args])
    return main(args)


def _truncate(part: Path) -> None:
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])


def test_repair_quarantines_damaged_parts_and_the_reruns_it_names_restore_every_table(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("vllm")
    ws = Workspace(tmp_path / "ws")
    other = _other_model(tiny_model_dir, tmp_path / "other")
    first = write_jsonl(tmp_path / "first.jsonl", CHATS[:30] + ["{broken"])
    second = write_jsonl(tmp_path / "second.jsonl", CHATS[30:] + ['{"prompt": "no reply"}'])
    w, tiny = str(ws.root), str(tiny_model_dir)
    build = [
        ["ingest", str(first), "-w", w, "--extract-answer", "hash", "--heldout-fraction", "0.2", "--quiet"],
        ["ingest", str(second), "-w", w, "--extract-answer", "hash", "--heldout-fraction", "0.2", "--quiet"],
        ["score", "-w", w, "--model", tiny, "--ifd", *MODEL],
        ["score", "-w", w, "--pair", tiny, str(other), *MODEL],
        ["probe", "-w", w, "--model", tiny, *MODEL],
        ["select", "ppl_band", "-w", w, "--param", f"score_key={tiny}", "--param", "fraction=0.5", "--name", "band"],
        ["generate", "-w", w, "--teacher", tiny, "--dtype", "float32", "--from", "band", "--max-tokens", "12",
         "--batch-size", "4", "--quiet"],
    ]
    for args in build:
        assert curate(monkeypatch, args) == 0, args
    untouched = Workspace(tmp_path / "untouched")
    shutil.copytree(ws.root, untouched.root, ignore=shutil.ignore_patterns(".curate"))
    assert all(len(ws.parts(t)) for t in TABLES)

    damaged = []
    for table in TABLES:
        parts = ws.parts(table)
        # the runs record lost is the select run's: the selection's own manifest says how to remake it
        part = next(p for p in parts if p.name.startswith("select-")) if table == "runs" else parts[0]
        _truncate(part)
        damaged.append(str(part.relative_to(ws.root)))
    capsys.readouterr()

    # every command that meets a damaged part says what to do, never pyarrow's or DuckDB's words
    for args in (build[0], build[2], build[5], ["sql", "select count(*) from examples", "-w", w], ["export", "band", "-w", w,
                 "--format", "trl"], ["runs", "-w", w]):
        assert curate(monkeypatch, args) == 1, args
        err = capsys.readouterr().err
        assert f"curate verify --workspace {ws.root} --repair" in err, (args, err)
        assert "magic bytes" not in err.lower() and "Traceback" not in err, (args, err)

    assert curate(monkeypatch, ["verify", "-w", w]) == 1
    out = capsys.readouterr().out
    assert all(f"unreadable part: {path}" in out for path in damaged) and "--repair" in out
    assert curate(monkeypatch, ["verify", "-w", w, "--repair"]) == 0
    out = capsys.readouterr().out
    quarantine = next((ws.root / QUARANTINE).iterdir())
    for path in damaged:
        assert (quarantine / path).is_file() and not (ws.root / path).exists(), path  # moved, not deleted
        assert f"  {path}" in out
    for table in TABLES:
        assert f"to restore {table.replace('/', '_')}:" in out

    # the re-runs it names, in the order the stages ran, restore everything
    advised = [line.strip() for line in out.splitlines() if line.strip().startswith("curate ")]
    recorded = [" ".join(["curate", *args]) for args in build if args[0] != "select"]
    assert set(recorded) <= set(advised), (recorded, out)
    select_line = next(line for line in advised if line.startswith("curate select"))
    for args in build:
        command = shlex.split(select_line)[1:] if args[0] == "select" else args
        assert curate(monkeypatch, command) == 0, command
    report = verify(ws)
    assert report.ok, report.summary()

    for table in TABLES:
        if table == "runs":
            continue
        mine, theirs = rows(ws, table), rows(untouched, table)
        assert theirs, table
        if table in ("traces", "best_traces"):  # vLLM may sample other tokens in another batch: the requests must match
            assert [k for k, _ in mine] == [k for k, _ in theirs], table
        else:
            assert mine == theirs, table
    lost = re.sub(r"\.parquet$", "", Path(damaged[-1]).name)
    before = {r["run_id"] for r in pq.read_table(untouched.table_dir("runs")).to_pylist()}
    after = {r["run_id"] for r in pq.read_table(ws.table_dir("runs")).to_pylist()}
    assert before - after == {lost}  # one run's record is lost; everything else it made is back
