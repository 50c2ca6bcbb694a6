"""Bad rows are rejected with file, row and reason; good rows are always kept; writes are atomic."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from curate.store import workspace as workspace_module
from curate.stages.ingest import ingest
from curate.store.sql import connect

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def good(n: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {n}?"}, {"role": "assistant", "content": f"Answer {n}."}]}


# line number → (raw line, expected reason); good rows sit between them
BAD_LINES = {
    2: (b'{"messages": [{"role": "user", "content": "Hi"}', "malformed_json"),
    4: (b'["a", "list"]', "not_an_object"),
    5: (json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode(), "not_ending_with_assistant"),
    6: (json.dumps({"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "x"}]}).encode(), "unknown_role"),
    7: (json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}).encode(), "empty_content"),
    8: (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}).encode(), "missing_field"),
    9: (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}).encode(), "wrong_type"),
    10: (json.dumps({"messages": "hello"}).encode(), "wrong_type"),
    11: (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}', "invalid_utf8"),
    12: (json.dumps({"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]}).encode(), "oversized"),
    13: (json.dumps({"text": "just text"}).encode(), "unknown_format"),
    14: (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}).encode(), "no_user_turn"),
    15: (json.dumps({"messages": []}).encode(), "empty_conversation"),
    16: (json.dumps({"conversations": [{"from": "bot", "value": "x"}]}).encode(), "unknown_role"),
    17: (json.dumps({"instruction": "Do it", "output": 3}).encode(), "wrong_type"),
    18: (b'{"messages": [{"role": "user", "content": "\\udc80"}, {"role": "assistant", "content": "x"}]}', "invalid_utf8"),
}
GOOD_LINES = (1, 3, 19, 20)


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    lines: list = []
    for number in range(1, 21):
        if number in BAD_LINES:
            lines.append(BAD_LINES[number][0])
        else:
            lines.append(json.dumps(good(number)))
    return write_jsonl(tmp_path / "mixed.jsonl", lines)


def test_every_bad_row_is_rejected_with_line_and_reason(mixed_file: Path, workspace) -> None:
    report = ingest([str(mixed_file)], workspace=workspace, max_row_bytes=4096, progress=False)
    assert report.added == len(GOOD_LINES)
    assert report.rejected == Counter(reason for _, reason in BAD_LINES.values())
    con = connect(workspace)
    rejects = {row: reason for row, reason in con.execute("select row, reason from rejects").fetchall()}
    assert rejects == {line: reason for line, (_, reason) in BAD_LINES.items()}
    files = {f for (f,) in con.execute("select distinct source_file from rejects").fetchall()}
    assert files == {str(mixed_file)}
    details = dict(con.execute("select reason, detail from rejects where row in (6, 12)").fetchall())
    assert "wizard" in details["unknown_role"]
    assert "4,096" in details["oversized"]
    kept = sorted(r[0] for r in con.execute("select messages[1].content from examples").fetchall())
    assert kept == sorted(f"Question {n}?" for n in GOOD_LINES)


def test_reingest_adds_nothing_not_even_rejects(mixed_file: Path, workspace) -> None:
    ingest([str(mixed_file)], workspace=workspace, max_row_bytes=4096, progress=False)
    parts_before = {name: workspace.parts(name) for name in ("examples", "rejects")}
    again = ingest([str(mixed_file)], workspace=workspace, max_row_bytes=4096, progress=False)
    assert again.added == 0 and again.already_present == len(GOOD_LINES)
    assert {name: workspace.parts(name) for name in ("examples", "rejects")} == parts_before
    con = connect(workspace)
    assert con.execute("select count(*) from rejects").fetchall() == [(len(BAD_LINES),)]


def test_new_rows_in_a_grown_file_are_added_once(tmp_path: Path, workspace) -> None:
    path = write_jsonl(tmp_path / "grow.jsonl", [good(1), good(2)])
    ingest([str(path)], workspace=workspace, progress=False)
    write_jsonl(path, [good(1), good(2), good(3)])
    report = ingest([str(path)], workspace=workspace, progress=False)
    assert (report.added, report.already_present) == (1, 2)
    assert connect(workspace).execute("select count(*) from examples").fetchall() == [(3,)]


def test_whole_file_problems(tmp_path: Path, workspace) -> None:
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('[{"messages": ')
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"a": 1, "b": 2}')
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 not really")
    fine = write_jsonl(tmp_path / "fine.jsonl", [GOOD])
    report = ingest([str(p) for p in (broken_json, not_list, bad_parquet, fine)], workspace=workspace, progress=False)
    assert report.rejected == {"malformed_json": 1, "not_a_list": 1, "unreadable_file": 1}
    assert report.added == 1
    rows = connect(workspace).execute("select source_file, row from rejects order by source_file").fetchall()
    assert rows == [(str(bad_parquet), 0), (str(broken_json), 0), (str(not_list), 0)]


def test_json_array_rows_are_numbered(tmp_path: Path, workspace) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [GOOD, {"messages": [{"role": "user", "content": "only a question"}]}, good(3)]}))
    report = ingest([str(path)], workspace=workspace, progress=False)
    assert report.added == 2 and report.rejected == {"not_ending_with_assistant": 1}
    assert connect(workspace).execute("select row from rejects").fetchall() == [(2,)]


def test_csv_bad_rows(tmp_path: Path, workspace) -> None:
    path = tmp_path / "alpaca.csv"
    path.write_bytes(
        b"instruction,input,output\n"
        b"Name a colour.,,Blue.\n"
        b"Too,many,cells,here\n"
        b"Too few\n"
        b"Say caf\xe9,,ok\n"
        b'"Multi\nline",,"Fine."\n'
        b",,Empty instruction\n"
    )
    report = ingest([str(path)], workspace=workspace, progress=False)
    assert report.added == 2
    assert report.rejected == {"malformed_csv": 2, "invalid_utf8": 1, "empty_content": 1}
    rows = dict(connect(workspace).execute("select row, reason from rejects").fetchall())
    assert rows == {3: "malformed_csv", 4: "malformed_csv", 5: "invalid_utf8", 8: "empty_content"}


def test_missing_source_and_unsupported_type_are_named(tmp_path: Path, workspace) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ingest([str(tmp_path / "nope.jsonl")], workspace=workspace, progress=False)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        ingest([str(text)], workspace=workspace, progress=False)


def test_a_crash_while_writing_leaves_no_part(tmp_path: Path, workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [good(1), good(2)])
    real_write = pq.write_table

    def write_half_then_die(table, where, **kwargs):
        real_write(table.slice(0, 1), where, **kwargs)  # a partial file reaches the disk...
        raise KeyboardInterrupt  # ...and the process dies before the rename

    monkeypatch.setattr(workspace_module.pq, "write_table", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        ingest([str(path)], workspace=workspace, progress=False)
    monkeypatch.setattr(workspace_module.pq, "write_table", real_write)
    assert workspace.parts("examples") == []  # the half-written temporary file is invisible to readers
    report = ingest([str(path)], workspace=workspace, progress=False)
    assert report.added == 2
    assert connect(workspace).execute("select count(*) from examples").fetchall() == [(2,)]
