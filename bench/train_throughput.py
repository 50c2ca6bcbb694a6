"""Training throughput of `train sft` on the bundled SmolLM2 and GSM8K, against this machine's ceiling.

    .venv/bin/python bench/train_throughput.py [--examples 40] [--batch-size 4] [--max-len 320] [--modes lora full]
                                               [--batching padded packed]

One run, one table. Each row trains the bundled SmolLM2-135M-Instruct with `train.sft.train` (the code `train
sft` runs) on the first ``--examples`` GSM8K problems as chats (question, worked solution), one epoch, in the
precision `auto` picks here, at torch's thread count. The first optimizer step is a warm-up and is not timed.

- all tokens/s: real (non-pad) tokens through forward and backward per second; trained tokens/s: the
  response tokens the loss covers, per second.
- padding: the share of the computed positions (rows x width of every micro-batch) that hold no token.
- ceiling: the best matmul rate measured in this run, in the training precision, at the same thread count,
  divided by the FLOPs one token needs: 6 N for full fine-tuning (forward 2 N, backward 4 N: gradients of the
  activations and of the weights), 4 N for LoRA (the frozen weights need no weight gradient; the adapters'
  own 6 x r (d_in + d_out) per projection are added). N counts every weight a token is multiplied by (the
  output projection once, tied or not; the embedding lookup is not a matmul). Attention's score and value
  products (about 4 x layers x hidden x mean context per token forward, ~3% at these lengths) are left out,
  so MFU (= all tokens/s / ceiling) is, if anything, an underestimate. The packed trainer computes the output
  projection only at trained positions, so its hardware does fewer FLOPs than 6 N (or 4 N) per token: its
  MFU is tokens/s against the standard computation, not a count of the FLOPs it ran.

Cores shared with other jobs slow the wall clock of training and of the matmul peak alike but not evenly, so
the ceiling and MFU are in core-seconds (process CPU time / threads): the rate the process would run at with
its threads' cores to itself. Wall-clock rates are shown beside them.

Rows where the installed trainer has no ``batching`` option (the code before packing) run its one batching
and say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("CURATE_MODELS", str(REPO / ".cache" / "models"))  # the tests' model cache


def gsm8k_chats(path: Path, count: int) -> Path:
    """The first ``count`` bundled GSM8K problems as chats in a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.models.bundled import BUILTIN_SOURCES

    lines = BUILTIN_SOURCES["gsm8k"].path().read_text().splitlines()[:count]
    rows = [json.loads(line) for line in lines]
    pq.write_table(pa.Table.from_pylist([{"example_id": f"g{i:04d}", "messages": [
        {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        for i, r in enumerate(rows)]), path)
    return path


def core_seconds(wall: float, cpu: float) -> float:
    """Seconds the process would have taken with its threads' cores to itself: its CPU time over the thread
    count (never more than the wall time). On cores shared with other jobs the wall time measures the sharing."""
    import torch

    return min(wall, cpu / torch.get_num_threads())


def matmul_peak(dtype_name: str) -> float:
    """The best FLOP per core-second (``core_seconds``) of several timed trials on a square matmul and two of
    the model's shapes (the MLP's up projection and the output projection over the vocabulary, 1,024
    tokens), in ``dtype_name``."""
    import torch

    dtype, best = getattr(torch, dtype_name), 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 576, 1536), (1024, 576, 49152)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        for _ in range(5):
            reps, wall, cpu = 4, time.perf_counter(), time.process_time()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * m * k * n * reps / core_seconds(time.perf_counter() - wall, time.process_time() - cpu))
    return best


def flops_per_token(model_dir: str, lora_r: int) -> tuple[float, int]:
    """(FLOPs per trained-through token, N) for full fine-tuning (6 N) or LoRA of rank r on every linear (4 N + adapters)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n = sum(m.weight.numel() for m in linears)  # every projection, the output head included (tied or not)
    if not lora_r:
        return 6.0 * n, n
    adapters = sum(lora_r * (m.in_features + m.out_features) for m in linears if m is not model.get_output_embeddings())
    return 4.0 * n + 6.0 * adapters, n


def run(data: Path, model_dir: str, *, lora_r: int, batching: str | None, batch_size: int, max_len: int, steps: int | None) -> dict:
    import torch

    import train.sft as sft
    from train.config import TrainConfig

    options = {"data": str(data), "model": model_dir, "out": "unused", "lora_r": lora_r, "lr": 1e-4, "batch_size": batch_size,
               "max_len": max_len, "max_steps": steps, "seed": 0}
    if batching is not None:
        options["batching"] = batching
    config = TrainConfig(**options)
    clock: list[tuple[float, float]] = []  # (wall, CPU) after every optimizer step, old trainer or new
    real_step = torch.optim.AdamW.step

    def timed_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        clock.append((time.perf_counter(), time.process_time()))
        return result

    torch.optim.AdamW.step = timed_step
    try:
        _, _, summary = sft.train(config, progress=False)
    finally:
        torch.optim.AdamW.step = real_step
    log = summary["log"]
    if len(log) < 2:
        raise SystemExit(f"only {len(log)} optimizer step(s): give more --examples (the first step is a warm-up)")
    seen = [round(r["tokens_per_s"] * r["seconds"]) for r in log]  # cumulative tokens, as the trainer logs them
    tokens = [r.get("tokens", s - p) for r, s, p in zip(log, seen, [0, *seen[:-1]])]
    if all("positions" in r for r in log):
        positions = [r["positions"] for r in log]
        used = batching
    else:  # the trainer before packing: every micro-batch padded to its longest example
        from transformers import AutoTokenizer

        from train.data import load_examples, read_table

        examples, _ = load_examples(read_table(data), AutoTokenizer.from_pretrained(model_dir), max_len=max_len, source=str(data))
        positions = [sum(len(m) * max(len(e.input_ids) for e in m) for m in step) for step in sft.batches(examples, config)]
        used = "padded (the trainer's only batching)"
    timed = log[1:]
    seconds = clock[-1][0] - clock[0][0]
    return {"mode": "LoRA r=%d" % lora_r if lora_r else "full", "batching": used, "steps": len(timed), "seconds": seconds,
            "core_seconds": core_seconds(seconds, clock[-1][1] - clock[0][1]),
            "tokens": sum(tokens[1:]), "trained": sum(r["targets"] for r in timed), "positions": sum(positions[1:]),
            "precision": sft.resolve_precision(config.precision)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=40, help="GSM8K chats to train on, one epoch (default 40)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default 4, the bundled study's)")
    parser.add_argument("--max-len", type=int, default=320, help="tokens per example (default 320, the bundled study's)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--batching", nargs="+", choices=("padded", "packed"), default=["padded", "packed"],
                        help="batchings to compare (a trainer without the option runs its only one)")
    args = parser.parse_args()

    import torch

    from curate.kernel.machine import describe, resolve_precision
    from curate.models.registry import pull
    from train.config import TrainConfig

    model_dir = str(pull("smollm2"))
    precision = resolve_precision("auto")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        data = gsm8k_chats(Path(scratch) / "gsm8k.parquet", args.examples)
        has_batching = "batching" in {f.name for f in dataclasses.fields(TrainConfig)}
        for mode in args.modes:
            for batching in args.batching if has_batching else [None]:  # the old trainer has one batching
                peak_before = matmul_peak(precision)
                result = run(data, model_dir, lora_r=16 if mode == "lora" else 0, batching=batching, batch_size=args.batch_size,
                             max_len=args.max_len, steps=args.max_steps)
                result["flops"], n = flops_per_token(model_dir, 16 if mode == "lora" else 0)
                result["peak"] = (peak_before + matmul_peak(precision)) / 2  # the ceiling around this row's training
                results.append(result)
                print(f"  {result['mode']}, {result['batching']}: {result['tokens'] / result['seconds']:,.1f} tokens/s", file=sys.stderr)
    print(f"\n{describe()}; torch {torch.__version__}; precision {precision} (auto); peak: the best {precision} matmul rate "
          f"(2048^3 and the model's shapes, {torch.get_num_threads()} threads), the mean of its measures just before and "
          f"after each row's training")
    print(f"SmolLM2-135M-Instruct (N = {n / 1e6:,.1f}M weights in matmuls), first {args.examples} GSM8K chats, "
          f"batch {args.batch_size}, max_len {args.max_len}; first step not timed\n")
    print("| mode | batching | steps | all tokens/s (wall) | trained tokens/s (wall) | all tokens/s (core) | trained tokens/s (core) "
          "| padding | FLOP/token | peak GFLOP/s (core) | ceiling tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rate, ceiling = r["tokens"] / r["core_seconds"], r["peak"] / r["flops"]
        print(f"| {r['mode']} | {r['batching']} | {r['steps']} | {r['tokens'] / r['seconds']:,.1f} | {r['trained'] / r['seconds']:,.1f} | "
              f"{rate:,.1f} | {r['trained'] / r['core_seconds']:,.1f} | {100 * (1 - r['tokens'] / r['positions']):.0f}% | "
              f"{r['flops'] / 1e9:.2f} G | {r['peak'] / 1e9:,.0f} | {ceiling:,.0f} | {100 * rate / ceiling:.0f}% |")


if __name__ == "__main__":
    main()
