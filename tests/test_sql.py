"""SQL over workspace views, from DuckDB, from Polars, and from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from conftest import REPO, write_jsonl
from curate.store import sql
from curate.cli import main
from curate.stages.ingest import ingest

QUERY = "select split, count(*) as n from examples group by split order by split"


@pytest.fixture
def filled(tmp_path: Path, workspace):
    rows = [
        {"prompt": f"Q{i}?", "completion": f"A{i}.", "gold": str(i)} for i in range(40)
    ] + ['{"broken']
    ingest([str(write_jsonl(tmp_path / "qa.jsonl", rows))], workspace=workspace, heldout_fraction=0.5,
           answer_field="gold", progress=False)
    return workspace


def test_views_for_each_table(filled) -> None:
    con = sql.connect(filled)
    names = {name for (name,) in con.execute("select view_name from duckdb_views() where not internal").fetchall()}
    assert names == {"examples", "rejects", "runs"}  # runs: the ingest's record
    counts = dict(con.execute(QUERY).fetchall())
    assert sum(counts.values()) == 40 and set(counts) == {"heldout", "pool"}


def test_polars_context_gives_the_same_result(filled) -> None:
    from_duckdb = sql.connect(filled).sql(QUERY).pl()
    from_polars = sql.polars_context(filled).execute(QUERY, eager=True)
    assert from_polars.cast({"n": pl.Int64}).equals(from_duckdb.cast({"n": pl.Int64}))


def test_a_new_table_appears_without_code_changes(filled) -> None:
    filled.write_part("token_scores", pa.table({"example_id": ["a"], "x": [1.0]}), schema=pa.schema([("example_id", pa.string()), ("x", pa.float64())]))
    filled.write_part("selections/easy", pa.table({"example_id": ["a"]}), schema=pa.schema([("example_id", pa.string())]))
    con = sql.connect(filled)
    assert con.execute("select x from token_scores").fetchall() == [(1.0,)]
    assert con.execute("select count(*) from selections_easy").fetchall() == [(1,)]


def test_output_formats(filled, tmp_path: Path) -> None:
    csv_text = sql.run(QUERY, workspace=filled, output_format="csv")
    assert csv_text.splitlines()[0] == "split,n"
    lines = sql.run(QUERY, workspace=filled, output_format="json").splitlines()
    assert {json.loads(line)["split"] for line in lines} == {"heldout", "pool"}
    out = tmp_path / "r.parquet"
    assert sql.run(QUERY, workspace=filled, output_format="parquet", output=out) == f"wrote {out}"
    assert pl.read_parquet(out).height == 2
    table = sql.run("select * from examples", workspace=filled, max_rows=5)
    assert "first 5 rows shown" in table
    with pytest.raises(ValueError, match="needs --output"):
        sql.run(QUERY, workspace=filled, output_format="parquet")


def test_cli_sql_from_argument_file_and_stdin(filled, tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["sql", QUERY, "--workspace", str(filled.root), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("split,n")
    assert main(["sql", "--file", str(REPO / "sql/explore/examples_by_split.sql"), "-w", str(filled.root)]) == 0
    assert "with_reference_answer" in capsys.readouterr().out
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("select count(*) as total from rejects"))
    assert main(["sql", "-w", str(filled.root), "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["total", "1"]


def test_cli_sql_errors_are_clear(tmp_path: Path, capsys) -> None:
    assert main(["sql", "select 1", "-w", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_sql_error_names_the_tables(filled, capsys) -> None:
    assert main(["sql", "select * from sample_scores", "-w", str(filled.root)]) == 1
    err = capsys.readouterr().err
    assert "sample_scores does not exist" in err and "tables in this workspace: examples, rejects, runs" in err
