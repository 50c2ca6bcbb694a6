"""Every input format, in every file type, becomes the same canonical messages."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from curate.stages.ingest import ingest, split_of
from curate.stages.records import example_id
from curate.store.sql import connect

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2+3 = 5\n#### 5"},
]
NO_SYSTEM = CHAT[1:]


def examples(workspace) -> list[dict]:
    return connect(workspace).sql("select * from examples order by example_id").pl().to_dicts()


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": CHAT}, CHAT),
        (
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "What is 2+3?"},
                    {"from": "gpt", "value": "2+3 = 5\n#### 5"},
                ]
            },
            CHAT,
        ),
        ({"conversations": [{"from": "human", "value": "What is 2+3?"}, {"from": "gpt", "value": "2+3 = 5\n#### 5"}], "system": "Be brief."}, CHAT),
        ({"instruction": "What is 2+3?", "input": "", "output": "2+3 = 5\n#### 5"}, NO_SYSTEM),
        ({"instruction": "What is 2+3?", "output": "2+3 = 5\n#### 5", "system": "Be brief."}, CHAT),
        (
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        ),
        ({"prompt": "What is 2+3?", "completion": "2+3 = 5\n#### 5"}, NO_SYSTEM),
        ({"prompt": CHAT[:2], "completion": CHAT[2:]}, CHAT),
    ],
    ids=["messages", "sharegpt", "sharegpt-system-field", "alpaca", "alpaca-system", "alpaca-input", "prompt-completion", "prompt-completion-lists"],
)
def test_each_format_gives_canonical_messages(tmp_path: Path, workspace, record: dict, expected: list) -> None:
    report = ingest([str(write_jsonl(tmp_path / "in.jsonl", [record]))], workspace=workspace, progress=False)
    assert report.added == 1 and not report.rejected
    (row,) = examples(workspace)
    assert row["messages"] == expected
    assert row["example_id"] == example_id(expected)
    assert row["split"] == "pool"


def _write_all_file_types(folder: Path, records: list[dict]) -> list[Path]:
    folder.mkdir()
    jsonl = write_jsonl(folder / "a.jsonl", records[:1])
    as_json = folder / "b.json"
    as_json.write_text(json.dumps(records[1:2]))
    as_csv = folder / "c.csv"
    with open(as_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow(records[2])
    as_parquet = folder / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records[3:4]), as_parquet)
    (folder / "notes.txt").write_text("not data")  # ignored inside a directory
    return [jsonl, as_json, as_csv, as_parquet]


def test_every_file_type_and_directories(tmp_path: Path, workspace) -> None:
    records = [
        {"messages": CHAT},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"prompt": "Capital of France?", "completion": "Paris."},
    ]
    _write_all_file_types(tmp_path / "data", records)
    report = ingest([str(tmp_path / "data")], workspace=workspace, progress=False)
    assert (report.rows_read, report.added, sum(report.rejected.values())) == (4, 4, 0)
    rows = examples(workspace)
    by_last = {r["messages"][-1]["content"]: r for r in rows}
    assert set(by_last) == {"2+3 = 5\n#### 5", "Hello!", "Blue.", "Paris."}
    origin = json.loads(by_last["Blue."]["meta"])["origin"]
    assert origin["file"].endswith("c.csv") and origin["row"] == 2  # line 2: the line after the header
    assert by_last["Paris."]["source"].endswith("d.parquet")


def test_csv_messages_column_holds_json(tmp_path: Path, workspace) -> None:
    path = tmp_path / "chats.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "messages"])
        writer.writerow(["7", json.dumps(NO_SYSTEM)])
    ingest([str(path)], workspace=workspace, progress=False)
    (row,) = examples(workspace)
    assert row["messages"] == NO_SYSTEM
    assert json.loads(row["meta"])["fields"] == {"id": "7"}


def test_parquet_with_list_of_struct_messages(tmp_path: Path, workspace) -> None:
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT, "score": 0.5}]), path)
    ingest([str(path)], workspace=workspace, progress=False)
    (row,) = examples(workspace)
    assert row["messages"] == CHAT
    assert json.loads(row["meta"])["fields"] == {"score": 0.5}


def test_column_map_and_forced_format(tmp_path: Path, workspace) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 2+3?", "answer": "2+3 = 5\n#### 5"}])
    report = ingest(
        [str(path)], workspace=workspace, fmt="prompt-completion", column_map={"question": "prompt", "answer": "completion"},
        answer_style="hash", progress=False,
    )
    assert report.added == 1
    (row,) = examples(workspace)
    assert row["messages"] == NO_SYSTEM
    assert row["reference_answer"] == "5"


def test_forced_format_rejects_rows_of_another_format(tmp_path: Path, workspace) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": CHAT}])
    report = ingest([str(path)], workspace=workspace, fmt="alpaca", progress=False)
    assert report.rejected == {"missing_field": 1}


def test_answer_field(tmp_path: Path, workspace) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": NO_SYSTEM, "gold": 5}])
    ingest([str(path)], workspace=workspace, answer_field="gold", progress=False)
    assert examples(workspace)[0]["reference_answer"] == "5"


def test_duplicates_collapse_and_are_counted(tmp_path: Path, workspace) -> None:
    same = {"messages": NO_SYSTEM}
    as_alpaca = {"instruction": "What is 2+3?", "output": "2+3 = 5\n#### 5"}  # same conversation, other format
    path = write_jsonl(tmp_path / "d.jsonl", [same, same, as_alpaca, {"prompt": "Other?", "completion": "Yes."}])
    report = ingest([str(path)], workspace=workspace, progress=False)
    assert (report.added, report.duplicates_in_input, report.already_present) == (2, 2, 0)
    assert len(examples(workspace)) == 2


def test_builtin_gsm8k_split_and_answers(workspace) -> None:
    report = ingest(["gsm8k"], workspace=workspace, progress=False)
    assert report.rows_read == 1319 and report.added == 1319 and not report.rejected
    con = connect(workspace)
    splits = dict(con.sql("select split, count(*) from examples group by split").fetchall())
    assert splits["pool"] + splits["heldout"] == 1319
    assert 0.20 < splits["heldout"] / 1319 < 0.30
    first = con.sql("select * from examples where messages[1].content like 'Janet%ducks%'").pl().to_dicts()[0]
    assert first["reference_answer"] == "18" and first["source"] == "gsm8k"
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert con.execute("select count(*) from examples where reference_answer is null").fetchall() == [(0,)]
    # the split is a pure function of the id, so it is the same on every machine and every run
    mismatched = [r for r in con.sql("select example_id, split from examples").fetchall() if split_of(r[0], 0.25) != r[1]]
    assert mismatched == []


# ---- whole files in one split -------------------------------------------------------------------------------


def _chats(first: int, count: int) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(first, first + count)]


def test_a_file_ingested_with_split_heldout_is_held_out_whole(tmp_path: Path, workspace) -> None:
    from curate.cli import main

    pool, evaluation = write_jsonl(tmp_path / "train.jsonl", _chats(0, 30)), write_jsonl(tmp_path / "eval.jsonl", _chats(100, 12))
    assert main(["ingest", str(pool), "-w", str(workspace.root), "--split", "pool", "--quiet"]) == 0
    assert main(["ingest", str(evaluation), "-w", str(workspace.root), "--split", "heldout", "--quiet"]) == 0
    rows = examples(workspace)
    by_origin = {json.loads(r["meta"])["origin"]["file"]: set() for r in rows}
    for row in rows:
        by_origin[json.loads(row["meta"])["origin"]["file"]].add(row["split"])
    assert by_origin == {str(pool): {"pool"}, str(evaluation): {"heldout"}}
    assert len(rows) == 42
    assert 0 < sum(split_of(r["example_id"], 0.25) == "heldout" for r in rows)  # a share by id would have mixed them


def test_an_example_never_changes_split_on_reingest(tmp_path: Path, workspace) -> None:
    """Re-ingesting a row with another split is an error naming it, with nothing written (not a silent move)."""
    from curate.stages.ingest import IngestConflict

    source = write_jsonl(tmp_path / "eval.jsonl", _chats(0, 10))
    ingest([str(source)], workspace=workspace, split="heldout", progress=False)
    before = examples(workspace)
    grown = write_jsonl(tmp_path / "more.jsonl", _chats(0, 10) + _chats(50, 5))  # the same 10 plus 5 new, as pool
    with pytest.raises(IngestConflict, match=r"10 example\(s\) are already in .* split 'heldout' .* 'pool' and None with these options"):
        ingest([str(grown)], workspace=workspace, split="pool", progress=False)
    moved = sum(split_of(r["example_id"], 0.5) == "pool" for r in before)
    with pytest.raises(IngestConflict, match=rf"^{moved} example"):  # a share drawn by id would move these
        ingest([str(source)], workspace=workspace, heldout_fraction=0.5, progress=False)
    assert examples(workspace) == before  # nothing written
    again = ingest([str(source)], workspace=workspace, split="heldout", progress=False)
    assert (again.added, again.already_present) == (0, 10)


@pytest.mark.parametrize(("value", "share"), [("0.25", 0.25), ("25%", 0.25), ("1", 1.0), ("0", 0.0), (0.5, 0.5)])
def test_heldout_fraction_takes_a_share_or_a_percentage(tmp_path: Path, workspace, value, share: float) -> None:
    source = write_jsonl(tmp_path / "chats.jsonl", _chats(0, 40))
    report = ingest([str(source)], workspace=workspace, heldout_fraction=value, progress=False)
    expected = sum(split_of(r["example_id"], share) == "heldout" for r in examples(workspace))
    assert report.splits.get("heldout", 0) == expected
    if share == 1.0:
        assert expected == 40


@pytest.mark.parametrize(("argv", "message"), [
    (["--heldout-fraction", "25"], r"'25'.*from 0 to 1.*looks like a percentage: write 0.25 or 25%"),
    (["--heldout-fraction", "-0.1"], r"'-0.1'.*from 0 to 1"),
    (["--heldout-fraction", "half"], r"'half'.*from 0 to 1 \(0.25\) or as a percentage"),
    (["--heldout-fraction", "0.2", "--split", "heldout"], "not both"),
])
def test_a_bad_split_option_is_a_clear_error(tmp_path: Path, workspace, capsys, argv: list[str], message: str) -> None:
    from curate.cli import main

    source = write_jsonl(tmp_path / "chats.jsonl", _chats(0, 3))
    assert main(["ingest", str(source), "-w", str(workspace.root), "--quiet", *argv]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not workspace.has_table("examples")
