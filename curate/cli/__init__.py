"""The ``curate`` command: a thin shell over the importable functions (one verb per stage). The verbs are
defined by group: workspace_verbs (ingest, sql, select, recipes, export, runs, verify), model_verbs (score,
probe, generate, models, serve), look_verbs (plot, show, report), experiment_verbs (instructdiff, study);
options holds the arguments several verbs share."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from curate.cli.experiment_verbs import add_instructdiff, add_study
from curate.cli.look_verbs import add_plot, add_report, add_show
from curate.cli.model_verbs import add_generate, add_models, add_probe, add_score, add_serve
from curate.cli.workspace_verbs import add_export, add_ingest, add_recipes, add_runs, add_select, add_sql, add_verify
from curate.kernel import logs
from curate.kernel.lock import WorkspaceBusy
from curate.store.verify import IntegrityError, damage_advice
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
    add_ingest(verbs)
    add_sql(verbs)
    add_score(verbs)
    add_probe(verbs)
    add_generate(verbs)
    add_select(verbs)
    add_recipes(verbs)
    add_export(verbs)
    add_plot(verbs)
    add_show(verbs)
    add_report(verbs)
    add_instructdiff(verbs)
    add_study(verbs)
    add_runs(verbs)
    add_verify(verbs)
    add_models(verbs)
    add_serve(verbs)
    return parser
