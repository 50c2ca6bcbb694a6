"""The ``train`` command: sft, calibrate, eval. A thin shell over train.sft and train.evaluate.

Training options left out take the ``--preset``'s value if one is named, else the TrainConfig default; an
option given explicitly always wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from curate.kernel.machine import PRECISIONS
from curate.kernel.vllm_factory import add_engine_arguments, engine_options
from train.data import SPANS
from train.evaluate import evaluate
from train.objectives import (
    EKSFT_COMBINE,
    EKSFT_NORMALISE,
    QTUNING_ENTROPY,
    QTUNING_NORMALISE,
    QTUNING_SEARCH,
)
from train.config import BATCHINGS, METHODS, PRESETS, SCHEDULERS, TrainConfig, configure
from train.sft import run_calibrate, run_sft

DESCRIPTION = """\
Fine-tune on curated Parquet (any tool's: needs a 'messages' column; honours 'loss_mask', 'input_ids',
'weight' and 'stage' when present), calibrate a model for InstructDiff / offline EKSFT, and evaluate."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except (FileNotFoundError, ValueError) as err:
        print(f"train {args.command}: error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train", description=DESCRIPTION)
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND")
    sft = _verb(verbs, "sft", "LoRA or full SFT on a Parquet file or folder (a curate selection, or any tool's). Loss on "
                "assistant tokens unless the rows carry a loss_mask; --method eksft|qtuning selects tokens online as the "
                "papers' reference code does (defaults: EKSFT ratio 0.2, union, entropy and KL terms at 0.05, each "
                "sequence weighed equally; Q-Tuning r_sample 0.25, r_token 0.5, the paper's headline run). Writes the "
                "adapter (or model), train_config.json, metrics.jsonl and loss_curve.png into --out.",
                "train sft --data ws/selections/complexity_split --stage 1 --model ~/.cache/curate/models/smollm2 --out runs/stage1",
                _run_sft)
    _training_args(sft)
    sft.add_argument("--method", choices=METHODS, help="sft (default), eksft or qtuning (online selection)")
    sft.add_argument("--stage", type=int, help="train only the rows of this stage (complexity_split: 1 answer-only, 2 traces)")
    eksft = sft.add_argument_group("EKSFT (--method eksft)")
    eksft.add_argument("--eksft-ratio", type=float, help="k = floor(ratio x a sequence's response tokens) per top-k (default 0.2)")
    eksft.add_argument("--eksft-combine", choices=EKSFT_COMBINE, help="union of the two top-k (default, the paper's script) or intersection")
    eksft.add_argument("--eksft-lambda-entropy", type=float, help="weight of the entropy bonus (default 0.05; 0 turns it off)")
    eksft.add_argument("--eksft-lambda-kl", type=float, help="weight of the KL term (default 0.05; 0 turns it off)")
    eksft.add_argument("--eksft-normalise", choices=EKSFT_NORMALISE, help="sequence (default: the reference weighs each sequence equally) or token")
    eksft.add_argument("--keep-end-of-turn", action="store_const", const=True, help="never mask the end-of-turn token (the reference may)")
    qtuning = sft.add_argument_group("Q-Tuning (--method qtuning)")
    qtuning.add_argument("--r-sample", type=float, help="share of samples kept per micro-batch (default 0.25)")
    qtuning.add_argument("--r-token", type=float, help="kept tokens = round(T r_sample r_token) of the batch's T positions (default 0.5)")
    qtuning.add_argument("--smoothing", type=float, help="lambda, the neighbours' weight in the token score (default 0.5)")
    qtuning.add_argument("--qtuning-entropy", choices=QTUNING_ENTROPY, help="sample entropy over all positions (default, the reference) or the response")
    qtuning.add_argument("--qtuning-search", choices=QTUNING_SEARCH, help="bisection result: last iterate (default, the reference) or best-under")
    qtuning.add_argument("--qtuning-normalise", choices=QTUNING_NORMALISE, help="loss per micro-batch over kept non-pad positions (default, the reference) or per trained token")
    calibrate = _verb(verbs, "calibrate", "Warm-up calibration (InstructDiff, offline EKSFT): SFT on a random --fraction of the pool, "
                      "saved as a normal checkpoint in --out that vLLM and transformers load (score it with curate score "
                      "--pair BASE CALIBRATED). InstructDiff's reference fine-tunes all weights: --full (or --preset "
                      "instructdiff-math); LoRA (the default here, cheaper on a CPU) is merged into the checkpoint.",
                      "train calibrate --data ws/examples --split pool --model ~/.cache/curate/models/smollm2 --fraction 0.1 --full --out models/calibrated",
                      _run_calibrate)
    _training_args(calibrate)
    calibrate.add_argument("--fraction", type=float, default=0.1, help="random share of rows to train on (default 0.1)")
    evaluate = _verb(verbs, "eval", "Held-out evaluation: mean answer NLL (teacher-forced, response tokens) and exact-match "
                     "accuracy of greedy generations against reference_answer (vLLM when installed). Prints and writes JSON.",
                     "train eval --model runs/easy/adapter --data ws/examples --split heldout --limit 100 --out runs/easy/eval.json",
                     _run_eval)
    evaluate.add_argument("--model", required=True, help="checkpoint directory, LoRA adapter directory, or hub id")
    evaluate.add_argument("--data", required=True, help="Parquet file or folder with messages (and reference_answer)")
    evaluate.add_argument("--split", help="keep only rows of this split (e.g. heldout)")
    evaluate.add_argument("--limit", type=int, help="first N rows only")
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--engine", choices=("auto", "vllm", "transformers"), default="auto", help="generation engine (auto: vLLM if installed)")
    evaluate.add_argument("--out", type=Path, help="write the metrics JSON here")
    add_engine_arguments(evaluate)
    return parser


def _verb(verbs: argparse._SubParsersAction, name: str, summary: str, example: str, handler) -> argparse.ArgumentParser:
    parser = verbs.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _training_args(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig(data="", model="", out="")
    parser.add_argument("--data", required=True, help="Parquet file or folder of parts")
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id, or a LoRA adapter folder (merged onto its base)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the settings of a paper's run (METHODS.md); explicit options override them")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--lora-r", type=int, help=f"LoRA rank on every linear projection (default {defaults.lora_r})")
    size.add_argument("--full", dest="lora_r", action="store_const", const=0, help="full fine-tuning instead of LoRA")
    parser.add_argument("--epochs", type=float, help=f"default {defaults.epochs}")
    parser.add_argument("--lr", type=float, help=f"default {defaults.lr}")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help=f"learning-rate schedule after the warm-up (default {defaults.scheduler})")
    parser.add_argument("--warmup-ratio", type=float, help="share of the steps with a linear warm-up (default 0)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    parser.add_argument("--adam-beta2", type=float, help=f"AdamW beta2 (default {defaults.adam_beta2})")
    parser.add_argument("--max-len", type=int, help=f"tokens per example; longer ones are cut (default {defaults.max_len})")
    parser.add_argument("--batch-size", type=int, help=f"examples per micro-batch (default {defaults.batch_size})")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--batching", choices=BATCHINGS,
                        help="packed: each micro-batch's examples in one row, no padding, attention within each example (plain "
                             "SFT); padded: rows padded to the longest; auto (default): packed for plain SFT, padded for "
                             "--method eksft|qtuning (they select per sequence). The same examples per micro-batch either way")
    parser.add_argument("--span", choices=SPANS,
                        help="which reply tokens train (rows without a loss mask): slot ({content}<|im_end|>\\n, as the EKSFT and "
                             "Q-Tuning reference forks train), content_eot (the reply and its end-of-turn token); auto (default): "
                             "slot for --method eksft|qtuning, content_eot for plain SFT")
    parser.add_argument("--split", help="keep only rows of this split (e.g. pool)")
    parser.add_argument("--limit", type=int, help="first N rows only")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="autocast precision; auto (default): bfloat16 where it is native (GPUs, CPUs with AVX-512 BF16 "
                             "or AMX), float32 elsewhere (emulated bf16 is several times slower)")
    parser.add_argument("--bf16", dest="precision", action="store_const", const="bfloat16", help="same as --precision bfloat16")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


TRAINING_OPTIONS = ("method", "lora_r", "epochs", "lr", "scheduler", "warmup_ratio", "weight_decay", "adam_beta2", "max_len",
                    "batch_size", "grad_accum", "max_steps", "batching", "span", "split", "limit", "precision", "seed", "stage", "fraction",
                    "eksft_ratio", "eksft_combine", "eksft_lambda_entropy", "eksft_lambda_kl", "eksft_normalise",
                    "keep_end_of_turn", "r_sample", "r_token", "smoothing", "qtuning_entropy", "qtuning_search", "qtuning_normalise")


def _config(args: argparse.Namespace) -> TrainConfig:
    given = {name: getattr(args, name) for name in TRAINING_OPTIONS if hasattr(args, name)}
    return configure({"data": args.data, "model": args.model, "out": args.out, **given}, preset=args.preset)


def _print_summary(summary: dict) -> None:
    print(f"steps {summary['steps']}, examples {summary['examples']}, tokens {summary['tokens_seen']:,}, "
          f"{summary['seconds']:.0f} s; loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; saved {summary['saved']}")


def _run_sft(args: argparse.Namespace) -> int:
    _print_summary(run_sft(_config(args), progress=not args.quiet))
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    _print_summary(run_calibrate(_config(args), progress=not args.quiet))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    metrics = evaluate(args.model, args.data, split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens, engine=args.engine,
                       options=engine_options(args))
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
