"""Trace generation throughput on the real SmolLM2 and GSM8K prompts, both paths in one run, one table.

    .venv/bin/python bench/generate_throughput.py [--prompts 64] [--max-tokens 128]

Same prompts (GSM8K questions in curate's chain-of-thought template, chat-templated), same max tokens,
greedy, float32. Each path runs in its own process (peak RSS is its own):
  plain-generate  HF transformers `generate`, one prompt at a time: how research scripts do it (the baseline)
  ours-vllm       curate.stages.generate: vLLM in-process, the whole batch at once (continuous batching)
Generated tokens/s counts completion tokens only; the ratio is against the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from children import peak_rss_mb, run_child

PATHS = ("plain-generate", "ours-vllm")


def prompt_messages(count: int) -> list[tuple[str, list[dict[str, str]], str]]:
    from curate.models.bundled import BUILTIN_SOURCES
    from curate.stages.prompts import load_template
    from curate.kernel.answers import extract_answer

    template = load_template("numeric", purpose="cot")
    rows = [json.loads(line) for line in BUILTIN_SOURCES["gsm8k"].path().read_text().splitlines()[:count]]
    return [(f"q{i}", template.apply([{"role": "user", "content": r["question"]}]), extract_answer(r["answer"], "hash")) for i, r in enumerate(rows)]


def prompt_workspace(prompts: list[tuple[str, list[dict[str, str]], str]], folder: Path) -> Any:
    """A workspace whose examples are the prompts (their ids, messages and reference answers)."""
    import pyarrow as pa

    from curate.store import schema
    from curate.store.workspace import Workspace

    ws = Workspace(folder)
    rows = [{"example_id": i, "source": "bench", "split": "pool", "messages": m, "reference_answer": a, "meta": "{}"} for i, m, a in prompts]
    ws.write_part("examples", pa.Table.from_pylist(rows, schema=schema.EXAMPLES), schema=schema.EXAMPLES)
    return ws


def run_path(path: str, count: int, max_tokens: int, workdir: Path) -> tuple[float, int]:
    """(seconds, generated tokens); model load excluded."""
    import torch

    from curate.models.registry import resolve

    model_dir = resolve("smollm2")
    prompts = prompt_messages(count)
    if path == "plain-generate":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        generated = 0
        start = time.perf_counter()
        for _, messages, _ in prompts:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            generated += out.shape[1] - ids["input_ids"].shape[1]
        return time.perf_counter() - start, generated
    if path == "ours-vllm":
        from curate.models.teacher import Sampling, open_teacher
        from curate.stages.generate import generate

        ws = prompt_workspace(prompts, workdir / "ws")
        teacher = open_teacher(model_dir, dtype="float32", max_len=2048)
        start = time.perf_counter()
        report = generate(ws, teacher, sampling=Sampling(max_tokens=max_tokens), batch_size=count, progress=False)
        return time.perf_counter() - start, report.completion_tokens
    raise ValueError(path)


def child(path: str, count: int, max_tokens: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        seconds, generated = run_path(path, count, max_tokens, Path(workdir))
    print(json.dumps({"path": path, "generated": generated, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.prompts, args.max_tokens)
        return
    results = []
    for path in args.paths:
        result = run_child(__file__, [path, "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)], label=path)
        if result is None:
            continue
        results.append(result)
        print(f"  {path}: {results[-1]['generated'] / results[-1]['seconds']:,.1f} generated tokens/s", file=sys.stderr)
    base = next((r["generated"] / r["seconds"] for r in results if r["path"] == "plain-generate"), None)
    print(f"\nSmolLM2-135M-Instruct, {args.prompts} GSM8K prompts, max {args.max_tokens} new tokens, greedy, float32, {os.cpu_count()} CPUs\n")
    print("| path | generated tokens | seconds | generated tokens/s | x plain generate | peak RSS (MB) |\n|---|---|---|---|---|---|")
    for r in results:
        rate = r["generated"] / r["seconds"]
        ratio = f"{rate / base:.2f}" if base else "n/a"
        print(f"| {r['path']} | {r['generated']:,} | {r['seconds']:.1f} | {rate:,.1f} | {ratio} | {r['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
