"""The ``train`` command: sft, calibrate, eval. A thin shell over train.sft and train.evaluate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from curate.kernel.machine import PRECISIONS
from train.sft import METHODS, TrainConfig

DESCRIPTION = """\
Fine-tune on curated Parquet (any tool's: needs a 'messages' column; honours 'loss_mask', 'input_ids',
'weight' when present), calibrate a model for InstructDiff / offline EKSFT, and evaluate."""


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
                "assistant tokens unless the rows carry a loss_mask; --method eksft|qtuning selects tokens online. Writes "
                "the adapter (or model), train_config.json, metrics.jsonl and loss_curve.png into --out.",
                "train sft --data ws/selections/easy --model ~/.cache/curate/models/smollm2 --out runs/easy", _run_sft)
    _training_args(sft)
    sft.add_argument("--method", choices=METHODS, default="sft", help="sft (default), eksft or qtuning (online selection)")
    sft.add_argument("--eksft-ratio", type=float, default=0.2, help="EKSFT: top share by entropy and by KL masked out (default 0.2)")
    sft.add_argument("--r-sample", type=float, default=0.5, help="Q-Tuning: share of samples kept per micro-batch (default 0.5)")
    sft.add_argument("--r-token", type=float, default=0.5, help="Q-Tuning: share of tokens kept in Q2 samples (default 0.5)")
    sft.add_argument("--smoothing", type=float, default=0.5, help="Q-Tuning: lambda, neighbour weight in the token score (default 0.5)")
    calibrate = _verb(verbs, "calibrate", "Warm-up calibration (InstructDiff, offline EKSFT): LoRA SFT on a random --fraction "
                      "of the pool, merged into a normal checkpoint in --out that vLLM and transformers load (score it "
                      "with curate score --pair BASE CALIBRATED).",
                      "train calibrate --data ws/examples --split pool --model ~/.cache/curate/models/smollm2 --fraction 0.1 --out models/calibrated",
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
    return parser


def _verb(verbs: argparse._SubParsersAction, name: str, summary: str, example: str, handler) -> argparse.ArgumentParser:
    parser = verbs.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="Parquet file or folder of parts")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--out", required=True, help="output directory")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every linear projection (default 16)")
    size.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-len", type=int, default=1024, help="tokens per example; longer ones are cut")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--split", help="keep only rows of this split (e.g. pool)")
    parser.add_argument("--limit", type=int, help="first N rows only")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast precision; auto (default): bfloat16 where it is native (GPUs, CPUs with AVX-512 BF16 "
                             "or AMX), float32 elsewhere (emulated bf16 is several times slower)")
    parser.add_argument("--bf16", dest="precision", action="store_const", const="bfloat16", help="same as --precision bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, **extra) -> TrainConfig:
    return TrainConfig(
        data=args.data, model=args.model, out=args.out, lora_r=0 if args.full else args.lora_r, epochs=args.epochs,
        lr=args.lr, max_len=args.max_len, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
        split=args.split, limit=args.limit, precision=args.precision, seed=args.seed, **extra,
    )


def _print_summary(summary: dict) -> None:
    print(f"steps {summary['steps']}, examples {summary['examples']}, tokens {summary['tokens_seen']:,}, "
          f"{summary['seconds']:.0f} s; loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; saved {summary['saved']}")


def _run_sft(args: argparse.Namespace) -> int:
    from train.sft import run_sft

    config = _config(args, method=args.method, eksft_ratio=args.eksft_ratio, r_sample=args.r_sample, r_token=args.r_token, smoothing=args.smoothing)
    _print_summary(run_sft(config, progress=not args.quiet))
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from train.sft import run_calibrate

    _print_summary(run_calibrate(_config(args, fraction=args.fraction), progress=not args.quiet))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from train.evaluate import evaluate

    metrics = evaluate(args.model, args.data, split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens, engine=args.engine)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
