"""Verbs that train (through the experiments layer): instructdiff, study."""

from __future__ import annotations

import argparse
from pathlib import Path

from curate.cli.options import engine_args, key_values, verb, workspace_arg

# ---- instructdiff -------------------------------------------------------------------------------------------


def add_instructdiff(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "instructdiff",
        "InstructDiff's iterations as one resumable command: calibrator 1 on a random warm-up slice of the pool "
        "(seed 42), calibrator k >= 2 trained from the base on selection k-1; each scored against the fixed base "
        "(score --pair) and selected again (recipe instructdiff -> selections/instructdiff_K). A re-run finishes "
        "what is missing. The reference fine-tunes the calibrators fully: --full or --preset instructdiff-math.",
        "curate instructdiff --workspace ws --model smollm2 --iterations 3 --full --prompt-format alpaca",
        _run_instructdiff,
    )
    workspace_arg(parser)
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
    engine_args(parser)
    parser.add_argument("--out", type=Path, help="where the calibrators go (default WORKSPACE/models/instructdiff)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_instructdiff(args: argparse.Namespace) -> int:
    # experiments import the trainer, and with it torch: lazy, so every other command starts fast
    from curate.experiments.instructdiff import iterate

    training = {k: v for k, v in {"lora_r": args.lora_r, "epochs": args.epochs, "lr": args.lr, "max_len": args.max_len,
                                  "preset": args.preset}.items() if v is not None}
    report = iterate(args.workspace, model=args.model, iterations=args.iterations, warmup_fraction=args.warmup_fraction,
                     split=args.split, params=key_values(args.param, "--param"), training=training, engine=args.engine,
                     dtype=args.dtype, prompt_format=args.prompt_format, out=args.out, progress=not args.quiet)
    print(report.summary())
    return 0


# ---- study --------------------------------------------------------------------------------------------------


def add_study(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
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
    workspace_arg(parser)
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
