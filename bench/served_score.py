"""Scoring in-process vs through vLLM's server, the same chats, one run, one table.

    .venv/bin/python bench/served_score.py [--examples 256] [--concurrency 8]

SmolLM2 in float32 everywhere (the served paths get float32 hidden states or log-probs), the same GSM8K
chats, through ``curate.stages.score.score`` (templating, engine, head, Parquet parts), start-ups not timed:
  in-process        vLLM's pooling runner in the curate process + our head: exact signals
  served exact      a `vllm serve --runner pooling` (token_embed): hidden states over HTTP + our head: exact
  served logprobs   a plain `vllm serve`: prompt log-probs, top-5 (no entropy)
Each server runs alone (one at a time) on this machine's cores; the ratio is against in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from generate_throughput import prompt_workspace


def chats(count: int) -> list[tuple[str, list[dict[str, str]], str]]:
    import json

    from curate.models.bundled import BUILTIN_SOURCES

    rows = [json.loads(line) for line in BUILTIN_SOURCES["gsm8k"].path().read_text().splitlines()[:count]]
    return [(f"q{i:04d}", [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}], "")
            for i, r in enumerate(rows)]


def timed(path: str, scorer, count: int) -> dict:
    from curate.stages.score import score

    with tempfile.TemporaryDirectory() as folder:
        ws = prompt_workspace(chats(count), Path(folder) / "ws")
        start = time.perf_counter()
        report = score(ws, scorer, progress=False)
        seconds = time.perf_counter() - start
    scorer.close()
    return {"path": path, "tokens": report.tokens_scored, "seconds": seconds, "scored": report.examples_scored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from curate.models.registry import resolve
    from curate.models.scorer import open_scorer, open_served_scorer
    from curate.models.served import POOLING_ARGS, Endpoint, local_server

    model = resolve("smollm2")
    results = [timed("in-process", open_scorer(model, dtype="float32", max_len=2048), args.examples)]
    for path, extra, signals in (("served exact", POOLING_ARGS, "exact"), ("served logprobs", (), "logprobs")):
        with local_server(model, *extra, name="smollm2") as url:
            scorer = open_served_scorer(Endpoint(url, "smollm2", concurrency=args.concurrency), signals=signals, max_len=2048)
            results.append(timed(path, scorer, args.examples))
        print(f"  {path}: {results[-1]['tokens'] / results[-1]['seconds']:,.0f} tokens/s", file=sys.stderr)
    base = results[0]["tokens"] / results[0]["seconds"]
    print(f"\nSmolLM2-135M-Instruct, {args.examples} GSM8K chats, float32, concurrency {args.concurrency}, {os.cpu_count()} CPUs\n")
    print("| path | examples | tokens | seconds | tokens/s | x in-process |\n|---|---|---|---|---|---|")
    for r in results:
        rate = r["tokens"] / r["seconds"]
        print(f"| {r['path']} | {r['scored']} | {r['tokens']:,} | {r['seconds']:.1f} | {rate:,.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
