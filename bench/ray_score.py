"""``curate score`` in one process vs on a local Ray cluster (Ray Data replicas), the same chats, one table.

    .venv/bin/python bench/ray_score.py [--examples 256] [--replicas 1 2] [--dtype auto]

Each path is the real command in a fresh process and a fresh workspace (GSM8K ingested, the first N chats),
shards of 32 examples. Two figures per path:
  wall            the whole command, start-ups included (Ray: the cluster and the replicas' engines; the run
                  key comes from the model's files on the driver, no engine is opened to learn it)
  steady tok/s    tokens scored after the first shard landed, over the time between the first and the last
                  written part: the throughput once every engine is up
The overhead is against the one-process run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD = 32


def run(folder: Path, examples: int, dtype: str, replicas: int | None) -> dict:
    import pyarrow.parquet as pq

    ws = folder / ("local" if replicas is None else f"ray{replicas}")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TQDM_DISABLE": "1"}
    curate = [sys.executable, "-m", "curate.cli"]
    subprocess.run([*curate, "ingest", "gsm8k", "-w", str(ws), "--quiet"], check=True, capture_output=True, env=env)
    command = [*curate, "score", "-w", str(ws), "--model", "smollm2", "--dtype", dtype, "--shard-size", str(SHARD), "--quiet",
               "--where", f"example_id in (select example_id from examples order by example_id limit {examples})"]
    if replicas is not None:
        command += ["--ray", "--replicas", str(replicas)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    parts = sorted((ws / "token_scores").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    tokens = [pq.read_table(p, columns=["n_tokens"]).column("n_tokens").to_numpy().sum() for p in parts]
    span = parts[-1].stat().st_mtime - parts[0].stat().st_mtime
    return {"path": "one process" if replicas is None else f"ray, {replicas} replica(s)", "wall": wall, "tokens": int(sum(tokens)),
            "steady": sum(tokens[1:]) / span if span > 0 else float("nan"), "parts": len(parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="auto", help="model precision (default auto: bf16 where native, else float32)")
    args = parser.parse_args()
    from curate.kernel.machine import resolve_precision

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for replicas in [None, *args.replicas]:
            results.append(run(Path(folder), args.examples, args.dtype, replicas))
            print(f"  {results[-1]['path']}: {results[-1]['wall']:.1f} s", file=sys.stderr)
    local = results[0]
    print(f"\nSmolLM2-135M-Instruct, {args.examples} GSM8K chats ({local['tokens']:,} tokens), {resolve_precision(args.dtype)}, "
          f"shards of {SHARD}, {os.cpu_count()} CPUs\n")
    print("| path | wall s | overhead (wall) | steady tok/s | overhead (steady) |\n|---|---|---|---|---|")
    for r in results:
        assert r["tokens"] == local["tokens"], f"{r['path']} scored {r['tokens']} tokens, the one-process run {local['tokens']}"
        print(f"| {r['path']} | {r['wall']:.1f} | {r['wall'] / local['wall'] - 1:+.0%} | {r['steady']:,.0f} | "
              f"{local['steady'] / r['steady'] - 1:+.0%} |")


if __name__ == "__main__":
    main()
