"""SQL over a workspace: one DuckDB view per table, and the same tables for Polars SQL.

    con = curate.store.sql.connect("ws")                    # DuckDB, views over the Parquet parts
    con.sql("select split, count(*) from examples group by 1").pl()

    ctx = curate.store.sql.polars_context("ws")             # Polars SQL over the same tables (lazy)
    ctx.execute("select split, count(*) as n from examples group by split", eager=True)

Views are made for every table found in the workspace, so tables written by later stages appear
without any change here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from curate.store.workspace import PART_SUFFIX, Workspace

if TYPE_CHECKING:
    import duckdb
    import polars as pl

OUTPUT_FORMATS = ("table", "csv", "parquet", "json")


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(workspace: Workspace | str | Path, *, database: str = ":memory:", tables: dict[str, Path] | None = None,
            into: "duckdb.DuckDBPyConnection | None" = None) -> "duckdb.DuckDBPyConnection":
    """DuckDB with a view per table (``tables``: only these; default every table in the workspace). ``into``: an
    open connection whose views are made anew (a stage run keeps one connection and sees the tables it wrote)."""
    import duckdb

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    if not ws.root.is_dir():
        raise FileNotFoundError(f"workspace {ws.root} does not exist; create it with `curate ingest ... --workspace`")
    con = into if into is not None else duckdb.connect(database)
    for name, files in _view_files(ws.tables() if tables is None else tables).items():
        pattern = _quote_literal(files)
        try:
            con.execute(
                f"create or replace view {_quote_identifier(name)} as "
                f"select * from read_parquet({pattern}, union_by_name = true)"
            )
        except duckdb.Error as err:  # a damaged part: the other tables stay usable
            damaged = "magic bytes" in str(err) or "too small to be a Parquet file" in str(err)
            reason = "a part of it is damaged (unreadable)" if damaged else str(err).splitlines()[0]
            print(f"warning: table {name} is left out: {reason}; `curate verify --workspace {ws.root} --repair` moves "
                  "damaged parts aside and says which re-run restores them", file=sys.stderr)
    return con


STUDY_FILES = {"": "results.parquet", "_heldout": "heldout.parquet"}  # a study's folder holds two tables as files


def _view_files(tables: dict[str, Path]) -> dict[str, str]:
    """View name -> the Parquet files it reads: a table's parts, but a study's folder (``studies/NAME``) gives
    ``studies_NAME`` (results.parquet, a row per arm x seed) and ``studies_NAME_heldout`` (heldout.parquet, a row
    per held-out example and arm x seed)."""
    files = {}
    for name, folder in tables.items():
        if folder.parent.name == "studies" and any((folder / f).is_file() for f in STUDY_FILES.values()):
            files |= {name + suffix: str(folder / f) for suffix, f in STUDY_FILES.items() if (folder / f).is_file()}
        else:
            files[name] = str(folder / f"*{PART_SUFFIX}")
    return files


def polars_context(workspace: Workspace | str | Path) -> "pl.SQLContext":
    import polars as pl

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    frames = {name: pl.scan_parquet(files) for name, files in _view_files(ws.tables()).items()}
    return pl.SQLContext(frames)


def run(
    query: str,
    *,
    workspace: Workspace | str | Path,
    output_format: str = "table",
    output: Path | None = None,
    max_rows: int = 40,
) -> str:
    """Run one query; return what to print (a table, CSV or JSON), or write Parquet/CSV/JSON to ``output``."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if output_format == "parquet" and output is None:
        raise ValueError("--format parquet needs --output FILE")
    con = connect(workspace)
    relation = con.sql(query)
    if relation is None:  # a statement with no result (e.g. `create view`)
        return ""
    if output is not None:
        if output_format == "table":
            raise ValueError("--output writes files: pick --format csv, parquet or json")
        if output_format == "parquet":
            relation.write_parquet(str(output))
        elif output_format == "csv":
            relation.write_csv(str(output))
        else:
            relation.pl().write_ndjson(str(output))
        return f"wrote {output}"
    if output_format == "table":
        return _table_text(relation, max_rows)
    frame = relation.pl()
    return frame.write_csv() if output_format == "csv" else frame.write_ndjson()


def _table_text(relation: "duckdb.DuckDBPyRelation", max_rows: int) -> str:
    """At most ``max_rows`` rows as a readable table (fetching no more than that, however big the result)."""
    import polars as pl

    frame = relation.limit(max_rows + 1).pl()
    more = frame.height > max_rows
    with pl.Config(
        tbl_rows=max_rows,
        tbl_cols=-1,
        fmt_str_lengths=60,
        tbl_width_chars=160,
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
    ):
        text = str(frame.head(max_rows))
    return text + (f"\n(first {max_rows} rows shown; use --max-rows or --output for more)" if more else "")
