"""Verbs that read and write the workspace without a model: ingest, sql, select, recipes, export, runs, verify."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from curate.cli.options import key_values, verb, workspace_arg
from curate.kernel.answers import STYLES
from curate.stages.export import FORMATS as EXPORT_FORMATS
from curate.stages.export import export
from curate.stages.ingest import ingest
from curate.stages.recipes import RECIPE_DIR, load_recipe
from curate.stages.records import FORMATS as INPUT_FORMATS
from curate.stages.select import select
from curate.store import sql
from curate.store.run_refs import runs_table
from curate.store.sql import OUTPUT_FORMATS
from curate.store.verify import repair, verify

# ---- ingest -------------------------------------------------------------------------------------------------


def add_ingest(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "ingest",
        "Read SFT data (JSONL, JSON, CSV, Parquet; files or directories, or the built-in `gsm8k`) into the "
        "`examples` table. Bad rows go to `rejects` with file, row and reason; good rows are always kept.",
        "curate ingest gsm8k data/my_chats.jsonl --workspace ws",
        _run_ingest,
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="file, directory, or built-in source name")
    workspace_arg(parser)
    parser.add_argument("--format", dest="fmt", choices=INPUT_FORMATS, help="force one format instead of detecting it per row")
    parser.add_argument(
        "--map",
        dest="column_map",
        action="append",
        default=[],
        metavar="SOURCE=TARGET",
        help="rename a source field before detection, e.g. --map question=prompt --map answer=completion",
    )
    parser.add_argument(
        "--extract-answer",
        dest="answer_style",
        choices=STYLES,
        help="fill reference_answer from the last assistant message (hash = GSM8K's '#### n')",
    )
    parser.add_argument("--answer-field", help="fill reference_answer from this source field instead")
    parser.add_argument(
        "--heldout-fraction",
        metavar="SHARE",
        help="share of examples put in the 'heldout' split, by hash: 0 to 1 or a percentage (default 0; gsm8k: 0.25)",
    )
    parser.add_argument("--split", choices=("pool", "heldout"),
                        help="put every row of these files in this split (a separate evaluation file: --split heldout)")
    parser.add_argument("--max-row-bytes", type=int, default=1 << 20, help="reject rows larger than this (default 1 MiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_ingest(args: argparse.Namespace) -> int:
    report = ingest(
        args.sources,
        workspace=args.workspace,
        fmt=args.fmt,
        column_map=key_values(args.column_map, "--map", "SOURCE=TARGET"),
        answer_style=args.answer_style,
        answer_field=args.answer_field,
        heldout_fraction=args.heldout_fraction,
        split=args.split,
        max_row_bytes=args.max_row_bytes,
        progress=not args.quiet,
    )
    print(report.summary())
    if report.rejected:
        where = os.path.relpath(args.workspace.table_dir("rejects"))
        print(f"rejected rows are in {where} (query: curate sql 'select * from rejects')")
    return 0


# ---- sql ----------------------------------------------------------------------------------------------------


def add_sql(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "sql",
        "Run SQL (DuckDB) over the workspace: one view per table (examples, rejects, and every table later "
        "stages write). With no query and no --file, reads queries interactively (or from standard input).",
        "curate sql \"select split, count(*) from examples group by split\" --workspace ws",
        _run_sql,
    )
    parser.add_argument("query", nargs="?", help="the SQL text")
    workspace_arg(parser)
    parser.add_argument("--file", "-f", type=Path, help="read the query from this .sql file")
    parser.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default="table")
    parser.add_argument("--output", "-o", type=Path, help="write the result to this file (csv, parquet or json)")
    parser.add_argument("--max-rows", type=int, default=40, help="rows shown in table output (default 40)")


def _run_sql(args: argparse.Namespace) -> int:
    if args.query and args.file:
        raise ValueError("give the query as an argument or with --file, not both")
    text = args.file.read_text(encoding="utf-8") if args.file else args.query
    if text is None:
        return _sql_shell(args) if sys.stdin.isatty() else _print_sql(sys.stdin.read(), args)
    return _print_sql(text, args)


def _print_sql(text: str, args: argparse.Namespace) -> int:
    import duckdb

    try:
        result = sql.run(text, workspace=args.workspace, output_format=args.output_format, output=args.output, max_rows=args.max_rows)
    except duckdb.Error as err:
        tables = ", ".join(args.workspace.tables()) or "none"
        raise ValueError(f"{err} (tables in this workspace: {tables})") from err
    print(result)
    return 0


def _sql_shell(args: argparse.Namespace) -> int:
    tables = ", ".join(args.workspace.tables()) or "none yet"
    print(f"curate sql on {args.workspace.root} (tables: {tables}). End a query with ';'. Ctrl-D quits.")
    buffer: list[str] = []
    while True:
        try:
            line = input("...> " if buffer else "sql> ")
        except EOFError:
            print()
            return 0
        buffer.append(line)
        if line.rstrip().endswith(";"):
            try:
                print(sql.run("\n".join(buffer), workspace=args.workspace, max_rows=args.max_rows))
            except Exception as err:  # keep the shell alive after a bad query
                print(f"error: {err}")
            buffer = []


# ---- select -------------------------------------------------------------------------------------------------


def add_select(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "select",
        "Run a SQL recipe (a name from `curate recipes`, or your own .sql file) over the workspace, audit the rows "
        "(unique ids that exist, masks as long as their tokens, never all zero, end-of-turn token trained; rows with "
        "no response token are dropped and counted) and write them to selections/NAME with a manifest (SQL and hash, "
        "parameters, input fingerprints, counts). Run parameters take a key or a model: a model alias or path means "
        "its latest finished run (curate runs lists them).",
        "curate select instructdiff --workspace ws --param base_key=smollm2 --param calibrated_key=models/calibrated --name idiff",
        _run_select,
    )
    parser.add_argument("recipe", help="recipe name (sql/recipes/NAME.sql) or path to a .sql file")
    workspace_arg(parser)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a recipe parameter (repeatable)")
    parser.add_argument("--name", help="selection name (default: the recipe's name)")
    parser.add_argument("--dry-run", action="store_true", help="run the recipe and the audits, print the counts, write nothing")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write a selection with no rows (refused by default: no rows is a mistake in the rule or its parameters)")


def _run_select(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    params = key_values(args.param, "--param")
    report = select(args.workspace, recipe, name=args.name or recipe.name, params=params, dry_run=args.dry_run,
                    allow_empty=args.allow_empty)
    print(report.summary())
    return 0


def add_recipes(verbs: argparse._SubParsersAction) -> None:
    verb(verbs, "recipes", "List the shipped SQL recipes (sql/recipes/) with their parameters and defaults.",
          "curate recipes", _run_recipes)


def _run_recipes(args: argparse.Namespace) -> int:
    for path in sorted(RECIPE_DIR.glob("*.sql")):
        recipe = load_recipe(path)
        print(f"{recipe.name}\n  {recipe.description}")
        for parameter in recipe.parameters.values():
            default = "required" if parameter.default is None else f"default {parameter.default}"
            print(f"    --param {parameter.name}=...  ({parameter.kind}, {default}) {parameter.description}")
    return 0


# ---- export -------------------------------------------------------------------------------------------------


def add_export(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "export",
        "Write a selection for another trainer: trl (messages, or input_ids + labels with -100 where masked), "
        "axolotl (input_ids, attention_mask, labels + a config snippet), llamafactory (ShareGPT JSON + "
        "dataset_info.json), jsonl (plain chat). Default folder: WORKSPACE/exports/NAME/FORMAT.",
        "curate export qtuning_offline --workspace ws --format trl --model smollm2",
        _run_export,
    )
    parser.add_argument("name", help="selection name (selections/NAME)")
    workspace_arg(parser)
    parser.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, required=True)
    parser.add_argument("--model", help="tokenizer for the tokenized formats: the model the scores came from")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--drop-masks", action="store_true", help="allow a masked selection in a chat format (masks are lost)")


def _run_export(args: argparse.Namespace) -> int:
    target = export(args.workspace, args.name, args.fmt, out=args.out, model=args.model, drop_masks=args.drop_masks)
    print(f"exported selection {args.name} as {args.fmt} to {target}")
    return 0


# ---- runs and verify ----------------------------------------------------------------------------------------


def add_runs(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "runs",
        "List the stage runs recorded in the workspace, newest first: when, stage, status (started, finished, failed, "
        "or died: started and never ended), key, seconds, model, counts. A recipe parameter or --score-key may name "
        "a model instead of a key: it means that model's latest finished run.",
        "curate runs --workspace ws --stage score",
        _run_runs,
    )
    workspace_arg(parser)
    parser.add_argument("--stage", help="only this stage (ingest, score, pair, probe, generate, select, export, sft, calibrate)")
    parser.add_argument("--limit", type=int, default=40, help="rows shown (default 40); curate sql 'select * from runs' shows all")


def _run_runs(args: argparse.Namespace) -> int:
    print(runs_table(args.workspace, stage=args.stage, limit=args.limit))
    return 0


def add_verify(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "verify",
        "Check the workspace: duplicate rows on each table's grain, orphans (rows whose example, trace or score run "
        "is missing), parts that do not parse, temporary files a killed writer left. Exit status 1 when anything "
        "is wrong. --clean removes stale temporaries (never while a writer is running). --repair moves unreadable "
        "parts and leftovers into WS/.curate/quarantine/ and says which stage re-run restores their rows.",
        "curate verify --workspace ws --repair",
        _run_verify,
    )
    workspace_arg(parser)
    parser.add_argument("--clean", action="store_true", help="remove temporary files left by writers that died")
    parser.add_argument("--repair", action="store_true", help="move unreadable parts and stale temporaries into "
                        ".curate/quarantine/ (nothing deleted) and print the re-runs that restore their rows")


def _run_verify(args: argparse.Namespace) -> int:
    if args.repair:
        report = repair(args.workspace)
        print(report.summary())
        return 0 if report.ok_but_orphans else 1
    report = verify(args.workspace, clean=args.clean)
    print(report.summary())
    return 0 if report.ok else 1
