"""Planted canaries: each kind spoils the reply the way it says, the shares are counted right, planted rows never
reach a held-out set or another study's pool whatever the predicates say, and `curate study --no-train` writes
the selections and their canary report and trains nothing."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from curate.experiments.study.plant import (
    KINDS,
    PlantSettings,
    count_canaries,
    plant,
    plant_settings,
    planted_kinds,
    study_predicates,
)
from curate.stages.ingest import ingest
from curate.store.sql import connect
from curate.store.workspace import Workspace

CHATS = [{"prompt": f"Tom has {i} apples and buys {i % 7 + 2} more. How many apples does he have?",
          "completion": f"He has {i} + {i % 7 + 2} = {i + i % 7 + 2} apples in the basket now.\n#### {i + i % 7 + 2}"} for i in range(90)]
SHARES = {"swapped": 0.1, "answer_changed": 0.08, "shuffled": 0.05, "truncated": 0.05}


@pytest.fixture
def apples(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ingest([str(write_jsonl(tmp_path / "apples.jsonl", CHATS))], workspace=ws, answer_style="hash", heldout_fraction=0.2, progress=False)
    return ws


def planted_rows(ws: Workspace, name: str) -> list[dict]:
    return connect(ws).sql(f"select * from examples where source = 'plant:{name}'").to_arrow_table().to_pylist()


def test_every_kind_spoils_the_reply_as_it_says_and_the_shares_are_of_the_planted_pool(apples: Workspace) -> None:
    pool, _ = study_predicates(apples, name="dirty", pool="split = 'pool'", heldout="split = 'heldout'", planted=False)
    with apples.writing():
        kinds = plant(apples, name="dirty", pool=pool, settings=PlantSettings(SHARES, seed=3))
    clean = {r["example_id"]: r for r in connect(apples).sql(f"select * from examples where {pool}").to_arrow_table().to_pylist()}
    scale = len(clean) / (1 - sum(SHARES.values()))
    assert Counter(kinds.values()) == {k: round(s * scale) for k, s in SHARES.items()}
    rows = planted_rows(apples, "dirty")
    assert {r["example_id"]: json.loads(r["meta"])["planted"]["kind"] for r in rows} == kinds == planted_kinds(apples, name="dirty")
    replies = {r["messages"][-1]["content"] for r in clean.values()}
    originals = [json.loads(r["meta"])["planted"]["original"] for r in rows]
    assert len(set(originals)) == len(originals)  # each original planted once
    for row in rows:
        meta = json.loads(row["meta"])["planted"]
        original = clean[meta["original"]]
        assert row["split"] == "pool" and row["reference_answer"] == original["reference_answer"]
        assert row["messages"][0] == original["messages"][0]  # the prompt is kept
        new, old = row["messages"][-1]["content"], original["messages"][-1]["content"]
        assert new != old
        if meta["kind"] == "swapped":
            assert new in replies
        elif meta["kind"] == "answer_changed":
            head_new, last_new = new.rsplit("#### ", 1)
            head_old, last_old = old.rsplit("#### ", 1)
            assert head_new == head_old and last_new != last_old and re.fullmatch(r"-?\d+", last_new)  # reasoning kept
        elif meta["kind"] == "shuffled":
            assert sorted(new.split()) == sorted(old.split())
        else:
            assert old.startswith(new) and 0.25 < len(new.split()) / len(old.split()) < 0.75  # a prefix, line breaks kept
    share = len(rows) / (len(rows) + len(clean))
    assert share == pytest.approx(sum(SHARES.values()), abs=0.02)


def test_planting_again_adds_nothing_and_other_settings_are_refused(apples: Workspace) -> None:
    pool, _ = study_predicates(apples, name="dirty", pool="split = 'pool'", heldout="split = 'heldout'", planted=False)
    with apples.writing():
        first = plant(apples, name="dirty", pool=pool, settings=PlantSettings(SHARES, seed=3))
        assert plant(apples, name="dirty", pool=pool, settings=PlantSettings(SHARES, seed=3)) == first
        assert len(planted_rows(apples, "dirty")) == len(first)
        with pytest.raises(ValueError, match="another pool or \\[plant\\] settings.*another name"):
            plant(apples, name="dirty", pool=pool, settings=PlantSettings(SHARES, seed=4))


def test_planted_rows_never_reach_a_heldout_set_or_another_studys_pool(apples: Workspace) -> None:
    pool, _ = study_predicates(apples, name="dirty", pool="split = 'pool'", heldout="split = 'heldout'", planted=False)
    with apples.writing():
        planted = set(plant(apples, name="dirty", pool=pool, settings=PlantSettings(SHARES, seed=3)))
    con = connect(apples)

    def ids(predicate: str) -> set[str]:
        return {r[0] for r in con.execute(f"select example_id from examples where {predicate}").fetchall()}

    # predicates that try to reach the planted rows: a pool of everything, a held-out set naming the source
    greedy = "true"
    grabbing = "split = 'heldout' or source like 'plant:%'"
    own_pool, own_heldout = study_predicates(apples, name="dirty", pool="split = 'pool'", heldout=grabbing, planted=True)
    other_pool, other_heldout = study_predicates(apples, name="other", pool=greedy, heldout=grabbing, planted=True)
    assert planted <= ids(own_pool) and not planted & ids(own_heldout)
    assert not planted & ids(other_pool) and not planted & ids(other_heldout)
    assert ids(own_heldout) == ids("split = 'heldout'")
    assert ids(other_pool) == ids("true") - planted


def test_canaries_are_counted_per_kind_in_rows_and_trained_tokens() -> None:
    planted = {"a": "swapped", "b": "swapped", "c": "truncated"}
    counts = count_canaries("arm", ["a", "b", "c", "x", "y", "a"], {"a": 10, "b": 5, "c": 2, "x": 20, "y": 13}, planted)
    assert counts.rows == 6 and counts.tokens == 50
    assert counts.planted_rows == {"swapped": 3, "truncated": 1} and counts.planted_tokens == {"swapped": 15, "truncated": 2}
    assert counts.row_share == pytest.approx(4 / 6) and counts.token_share == pytest.approx(17 / 50)


def test_plant_settings_are_checked_with_errors_that_say_what_to_give() -> None:
    assert plant_settings({}, where="s") is None
    assert plant_settings({"seed": 2, "truncated": 0.1}, where="s") == PlantSettings({"truncated": 0.1}, 2)
    for raw, message in (({"spoiled": 0.1}, "unknown plant kind"), ({"swapped": 1.5}, "a number in \\(0, 1\\)"),
                         ({"swapped": 0.5, "shuffled": 0.45}, "below 0.9"), ({"seed": "x", "swapped": 0.1}, "integer"),
                         ({"seed": 1}, "names no kind")):
        with pytest.raises(ValueError, match=message):
            plant_settings(raw, where="spec.toml")
    assert set(KINDS) == {"swapped", "answer_changed", "shuffled", "truncated"}


NO_TRAIN_SPEC = '''
name = "{name}"
model = "{model}"
pool = "{pool}"
heldout = "split = 'heldout' or source like 'plant:%'"
heldout_limit = 6
budget = 0.3
seeds = [0, 1]
engine = "transformers"
dtype = "float32"
{plant}
[training]
max_steps = 1
batch_size = 4
max_len = 96
precision = "float32"

[prepare]
score = true

[[arms]]
name = "full"

[[arms]]
name = "random"

[[arms]]
name = "longest"
recipe = "longest"
fit = {{ param = "fraction", low = 0.0, high = 1.0 }}
'''


@pytest.mark.slow
def test_no_train_writes_selections_and_their_canary_report_and_trains_nothing(apples: Workspace, tiny_model_dir: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import curate.experiments.study.run as study
    from curate.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("--no-train trained")

    monkeypatch.setattr(study, "run_sft", no_training)
    monkeypatch.setattr(study, "evaluate_examples", no_training)
    dirty = tmp_path / "dirty.toml"
    dirty.write_text(NO_TRAIN_SPEC.format(name="dirty", model=tiny_model_dir, pool="split = 'pool'",
                                          plant="\n[plant]\nseed = 1\nswapped = 0.15\ntruncated = 0.1\n"))
    assert main(["study", str(dirty), "-w", str(apples.root), "--no-train", "--quiet"]) == 0
    printed = capsys.readouterr().out
    folder = apples.root / "studies" / "dirty"
    assert "planted canaries" in printed and "nothing was trained" in printed
    assert not (folder / "results.parquet").exists() and not (folder / "report.md").exists()
    assert not list(folder.rglob("train_config.json")) and not list(folder.rglob("result.json"))
    planted = planted_kinds(apples, name="dirty")
    clean = connect(apples).execute("select count(*) from examples where split = 'pool' and source not like 'plant:%'").fetchall()[0][0]
    assert Counter(planted.values()) == {"swapped": round(0.15 * clean / 0.75), "truncated": round(0.1 * clean / 0.75)}
    heldout = pq.read_table(folder / "data" / "heldout" / "part-0.parquet").column("example_id").to_pylist()
    assert heldout and not set(heldout) & set(planted)  # its held-out predicate asked for them: refused

    from curate.experiments.study.budget import TokenCounter

    counter = TokenCounter(str(tiny_model_dir), 96)
    report = (folder / "canaries.md").read_text()
    for arm, names in (("random", ["study_dirty_random_s0", "study_dirty_random_s1"]), ("full", ["study_dirty_full"])):
        tables = [pq.read_table(apples.table_dir(f"selections/{n}") / "part-0.parquet") for n in names]
        rows = sum(t.num_rows for t in tables)
        planted_rows = sum(i in planted for t in tables for i in t.column("example_id").to_pylist())
        tokens = [counter.per_row(t) for t in tables]
        planted_tokens = sum(v for per in tokens for i, v in per.items() if i in planted)
        total = sum(sum(per.values()) for per in tokens)
        line = next(line for line in report.splitlines() if line.startswith(f"| {arm}"))
        assert f"| {rows:,} | {planted_rows:,} ({planted_rows / rows:.1%}) | {total:,} | {planted_tokens:,} ({planted_tokens / total:.1%}) |" in line
    pool_line = next(line for line in report.splitlines() if line.startswith("| pool"))
    full_line = next(line for line in report.splitlines() if line.startswith("| full"))
    assert pool_line.split("|")[2:] == full_line.split("|")[2:]  # full is the pool

    other = tmp_path / "other.toml"  # a second study in the same workspace whose pool asks for every planted row
    other.write_text(NO_TRAIN_SPEC.format(name="other", model=tiny_model_dir, pool="split = 'pool' or source like 'plant:%'", plant=""))
    assert main(["study", str(other), "-w", str(apples.root), "--no-train", "--quiet"]) == 0
    for folder in apples.root.glob("selections/study_other_*"):
        assert not set(pq.read_table(folder / "part-0.parquet").column("example_id").to_pylist()) & set(planted)
    assert "none (the spec has no [plant] section)" in (apples.root / "studies" / "other" / "canaries.md").read_text()
