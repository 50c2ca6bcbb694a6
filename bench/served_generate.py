"""A teacher in-process vs the same teacher behind vLLM's OpenAI-compatible server, one run, one table.

    .venv/bin/python bench/served_generate.py [--prompts 64] [--max-tokens 128] [--concurrency 1 8 32]

The same GSM8K prompts (curate's chain-of-thought template), greedy, the same max new tokens, SmolLM2 in
float32, through ``curate.stages.generate.generate`` every time:
  in-process     vLLM inside the curate process, the whole batch in one call (its own process: own RSS)
  served c=N     a local ``vllm serve`` of the same model (started once, start-up excluded), N requests in flight
Both engines share this machine's cores, one at a time. Generated tokens/s counts completion tokens; the
ratio is against in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from children import peak_rss_mb, run_child
from generate_throughput import prompt_messages, prompt_workspace


def in_process(count: int, max_tokens: int) -> dict:
    from curate.models.teacher import Sampling, open_teacher
    from curate.stages.generate import generate
    from curate.models.registry import resolve

    with tempfile.TemporaryDirectory() as folder:
        ws = prompt_workspace(prompt_messages(count), Path(folder) / "ws")
        teacher = open_teacher(resolve("smollm2"), dtype="float32", max_len=2048)
        start = time.perf_counter()
        report = generate(ws, teacher, sampling=Sampling(max_tokens=max_tokens), batch_size=count, progress=False)
        seconds = time.perf_counter() - start
    return {"path": "in-process", "generated": report.completion_tokens, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def served(url: str, count: int, max_tokens: int, concurrency: int) -> dict:
    from curate.models.teacher import Sampling, open_served_teacher
    from curate.stages.generate import generate
    from curate.models.served import Endpoint

    with tempfile.TemporaryDirectory() as folder:
        ws = prompt_workspace(prompt_messages(count), Path(folder) / "ws")
        teacher = open_served_teacher(Endpoint(url, "smollm2", concurrency=concurrency))
        start = time.perf_counter()
        report = generate(ws, teacher, sampling=Sampling(max_tokens=max_tokens), batch_size=count, progress=False)
        seconds = time.perf_counter() - start
    assert report.failed == 0, f"{report.failed} requests failed"
    return {"path": f"served c={concurrency}", "generated": report.completion_tokens, "seconds": seconds, "peak_rss_mb": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(in_process(args.prompts, args.max_tokens)))
        return
    from curate.models.registry import resolve
    from curate.models.served import local_server

    results = [run_child(__file__, ["--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)], label="in-process")]
    with local_server(resolve("smollm2"), name="smollm2") as url:
        for concurrency in args.concurrency:
            results.append(served(url, args.prompts, args.max_tokens, concurrency))
            print(f"  concurrency {concurrency}: {results[-1]['generated'] / results[-1]['seconds']:,.1f} tokens/s", file=sys.stderr)
    results = [r for r in results if r]
    base = next((r["generated"] / r["seconds"] for r in results if r["path"] == "in-process"), None)
    print(f"\nSmolLM2-135M-Instruct, {args.prompts} GSM8K prompts, max {args.max_tokens} new tokens, greedy, float32, "
          f"{os.cpu_count()} CPUs\n")
    print("| path | generated tokens | seconds | generated tokens/s | x in-process | peak RSS (MB) |\n|---|---|---|---|---|---|")
    for r in results:
        rate = r["generated"] / r["seconds"]
        rss = f"{r['peak_rss_mb']:,.0f}" if r["peak_rss_mb"] else "(in the server)"
        ratio = f"{rate / base:.2f}" if base else "n/a"
        print(f"| {r['path']} | {r['generated']:,} | {r['seconds']:.1f} | {rate:,.1f} | {ratio} | {rss} |")


if __name__ == "__main__":
    main()
