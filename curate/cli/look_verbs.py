"""Verbs that look at a workspace: plot, show, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from curate.cli.options import verb, workspace_arg
from curate.looks.plot import plot
from curate.looks.report import write_report
from curate.looks.show import show
from curate.store.run_refs import resolve

# ---- plot ---------------------------------------------------------------------------------------------------


def add_plot(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "plot",
        "Write PNGs: the error-uncertainty plane coloured by quadrant (plane.png), NLL and entropy histograms "
        "(histograms.png), and the answer-entropy probe's ROC curve (probe_roc.png). Default folder: WORKSPACE/plots.",
        "curate plot --workspace ws",
        _run_plot,
    )
    workspace_arg(parser)
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


def add_show(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "show",
        "One example in the terminal: every token coloured by a signal (entropy, NLL or KL; a legend gives the "
        "scale), response tokens underlined, the tokens a selection's mask leaves out struck through (between ⟦ ⟧ "
        "when the output is not a terminal), and the example's sample scores and quadrant.",
        "curate show 3fa1c2b4d5e6f708 --workspace ws --signal nll --selection qtuning_offline",
        _run_show,
    )
    parser.add_argument("example_id", help="the example (curate sql 'select example_id from examples')")
    workspace_arg(parser)
    parser.add_argument("--signal", choices=("entropy", "nll", "kl"), default="entropy", help="what the colours show (default entropy)")
    parser.add_argument("--selection", help="mark the tokens this selection's mask excludes from training")
    parser.add_argument("--run", help="the scoring run (a key or a model) when the example has several")
    parser.add_argument("--values", action="store_true", help="print each token's value after it")


def _run_show(args: argparse.Namespace) -> int:
    show(args.workspace, args.example_id, signal=args.signal, selection=args.selection, run=args.run, values=args.values)
    return 0


def add_report(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
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
    workspace_arg(parser)
    parser.add_argument("--out", type=Path, help="the HTML file (default WORKSPACE/reports/NAME.html)")
    parser.add_argument("--token-examples", type=int, default=1000,
                        help="examples whose tokens the file carries for the heatmaps (default 1,000; the table lists all)")


def _run_report(args: argparse.Namespace) -> int:
    print(write_report(args.workspace, args.name, out=args.out, token_examples=args.token_examples))
    return 0
