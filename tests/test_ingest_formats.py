"""Every input format, in every file type, becomes the same canonical messages."""

from __future__ import annotations

import csv
import json
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
