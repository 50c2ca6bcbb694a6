"""Recipes at scale: synthetic scores for N examples (104 tokens each by default: 1,000,000 examples is about
100M tokens per scored model), every recipe through DuckDB as `curate select` runs it, under a 1 GB
``memory_limit`` and 2 threads, at a baseline size and at N side by side, with the growth factors.

    .venv/bin/python bench/select_scale.py --examples 1000000 [--baseline 100000] [--memory-limit 1GB] [--threads 2]
    .venv/bin/python bench/select_scale.py --examples 100000 --pandas     # the same rules in pandas beside DuckDB
    .venv/bin/python bench/select_scale.py --bytes-per-token WS           # a real workspace's disk per scored token

The synthetic workspace is written chunk by chunk (vectorised numpy/Arrow, one Parquet part per 10,000
examples, as the stages write them), so building it never holds more than one chunk. Each (size, recipe,
engine) runs in its own process, so peak RSS is its own; time covers importing the libraries, reading the
Parquet and computing the rows (not writing them). ``spill MB`` is the largest size DuckDB's temporary
directory reached during the query (polled every 0.1 s). ``CPU s`` is the process's user + system time: on a machine shared with
other jobs it moves far less than wall time. With ``--pandas`` both engines must return the same
example ids (checked); pandas runs at one size only (its token-level rules need ~28x the Parquet in RAM), for
the recipes it has a rule for (PANDAS_RULES).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from children import peak_rss_mb, run_child

RECIPES = ("full", "random_budget", "ppl_band", "entropy_band", "ifd", "longest", "instructdiff", "complexity_split",
           "probe_hard", "eksft_offline", "qtuning_offline")
PARAMS = {"random_budget": {"budget_tokens": 500_000}, "ppl_band": {"band": "mid"}, "entropy_band": {"band": "max"}}
PART_ROWS = 10_000
# the recipes with a pandas rule: complexity_split's answer checks and Q-Tuning's bisection and fill-up have
# grown past what a short pandas rule states (their recipe tests check them against Python references)
PANDAS_RULES = ("full", "random_budget", "ppl_band", "entropy_band", "ifd", "longest", "instructdiff", "probe_hard", "eksft_offline")


# ---- synthetic workspace ----------------------------------------------------------------------------------

def build(root: Path, examples: int, tokens: int) -> None:
    """Write the tables part by part; chunk c's values come from its own seeded generator (same at any size)."""
    from curate.store.workspace import Workspace

    ws = Workspace(root)
    for chunk, begin in enumerate(range(0, examples, PART_ROWS)):
        n = min(PART_ROWS, examples - begin)
        for name, (table, table_schema) in chunk_tables(np.random.default_rng([0, chunk]), begin, n, tokens).items():
            ws.write_part(name, table, schema=table_schema)


def chunk_tables(rng: np.random.Generator, begin: int, n: int, tokens: int) -> dict:
    import pyarrow as pa

    from curate.store import schema

    prompt = tokens // 3  # the first third is the prompt, the rest the response (the last token: end of turn)
    offsets = pa.array(np.arange(0, n * tokens + 1, tokens, dtype=np.int32))
    first = np.zeros((n, tokens), dtype=bool)
    first[:, 0] = True  # element 0 of every signal list is null, like the real tables
    first = first.reshape(-1)

    def lists(values: np.ndarray, kind, mask: np.ndarray | None = None) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=kind, mask=mask))

    def repeat(value, kind=None) -> pa.Array:
        return pa.repeat(pa.scalar(value, kind), n) if kind is not None else pa.repeat(pa.scalar(value), n)

    def table(columns: dict, table_schema) -> tuple:
        arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in table_schema]
        return pa.Table.from_arrays(arrays, schema=table_schema), table_schema

    index = np.arange(begin, begin + n)
    ids = pa.array(np.char.zfill(np.char.mod("%x", index), 16))
    answers = pa.array(np.char.mod("%d", index % 100))
    turns = pa.StructArray.from_arrays([pa.array(np.tile(["user", "assistant"], n)), pa.array(np.tile(["q", "a"], n))],
                                       fields=list(schema.MESSAGE))
    messages = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turns)
    is_response = np.zeros((n, tokens), dtype=bool)
    is_response[:, prompt:] = True
    end_of_turn = np.zeros((n, tokens), dtype=bool)
    end_of_turn[:, -1] = True
    response_flags, end_flags = lists(is_response, pa.bool_()), lists(end_of_turn, pa.bool_())
    token_ids = lists(rng.integers(0, 49152, n * tokens, dtype=np.int32), pa.int32())
    out = {"examples": table({"example_id": ids, "source": repeat("synthetic"), "split": repeat("pool"), "messages": messages,
                              "reference_answer": answers}, schema.EXAMPLES)}
    scores, samples = [], []
    for key, shift in (("base", 0.0), ("calibrated", -0.1)):
        logprob = -rng.gamma(1.0, 1.0 + shift, (n, tokens)).astype(np.float32)
        entropy = rng.gamma(2.0, 0.8, (n, tokens)).astype(np.float32)
        scores.append(table({"example_id": ids, "score_key": repeat(key), "variant": repeat("chat"), "signals": repeat("exact"),
                             "n_tokens": repeat(tokens, pa.int32()), "token_ids": token_ids, "is_response": response_flags,
                             "is_end_of_turn": end_flags, "logprob": lists(logprob, pa.float32(), first),
                             "entropy": lists(entropy, pa.float32(), first)}, schema.TOKEN_SCORES))
        nll = -logprob[:, prompt:].mean(axis=1)
        content = slice(prompt, tokens - 1)  # the response without its end-of-turn token
        samples.append(table({"example_id": ids, "score_key": repeat(key), "n_tokens": repeat(tokens, pa.int32()),
                              "n_response_tokens": repeat(tokens - prompt, pa.int32()), "mean_nll": pa.array(nll, pa.float64()),
                              "ppl": pa.array(np.exp(nll), pa.float64()), "mean_entropy": pa.array(entropy[:, prompt:].mean(axis=1), pa.float64()),
                              "n_content_tokens": repeat(tokens - prompt - 1, pa.int32()),
                              "mean_nll_content": pa.array(-logprob[:, content].mean(axis=1), pa.float64()),
                              "mean_entropy_content": pa.array(entropy[:, content].mean(axis=1), pa.float64()),
                              "ifd": pa.array(rng.uniform(0.3, 1.2, n))}, schema.SAMPLE_SCORES))
    out["token_scores"] = (pa.concat_tables([t for t, _ in scores]), schema.TOKEN_SCORES)
    out["sample_scores"] = (pa.concat_tables([t for t, _ in samples]), schema.SAMPLE_SCORES)
    out["pair_scores"] = table({"example_id": ids, "pair_key": repeat("pair"), "base_key": repeat("base"), "calibrated_key": repeat("calibrated"),
                                "n_tokens": repeat(tokens, pa.int32()), "is_response": response_flags,
                                "kl": lists(rng.gamma(0.5, 0.1, (n, tokens)).astype(np.float32), pa.float32(), first)}, schema.PAIR_SCORES)
    out["probe_scores"] = table({"example_id": ids, "probe_key": repeat("probe"), "entropy_norm": pa.array(rng.uniform(0, 0.5, n)),
                                 "is_valid": pa.array(rng.uniform(size=n) < 0.95), "reference_answer": answers}, schema.PROBE_SCORES)
    trace_ids = pa.array(np.char.add("t", ids.to_numpy(zero_copy_only=False).astype(str)))
    correct = pa.array(rng.uniform(size=n) < 0.6)
    out["traces"] = table({"trace_id": trace_ids, "example_id": ids, "gen_key": repeat("gen"), "sample_index": repeat(0, pa.int32()),
                           "prompt": messages, "text": repeat("step by step #### 1"), "extracted_answer": repeat("1"),
                           "is_correct": correct, "finish_reason": repeat("stop"), "truncated": repeat(False)}, schema.TRACES)
    out["best_traces"] = table({"example_id": ids, "gen_key": repeat("gen"), "rule": repeat("shortest"), "trace_id": trace_ids,
                                "text": repeat("step by step #### 1"), "is_correct": correct, "truncated": repeat(False)}, schema.BEST_TRACES)
    return out


KEYS = {"score_key": "base", "base_key": "base", "calibrated_key": "calibrated", "pair_key": "pair", "probe_key": "probe", "gen_key": "gen"}


# ---- the same rules in pandas -----------------------------------------------------------------------------

def pandas_rule(root: Path, recipe: str) -> list[str]:
    import pandas as pd

    def read(table: str, columns: list[str]) -> "pd.DataFrame":
        return pd.read_parquet(root / table, columns=columns)

    pool = read("examples", ["example_id", "split"])
    pool = pool[pool.split == "pool"][["example_id"]]
    if recipe == "full":
        return sorted(pool.example_id)
    samples = read("sample_scores", ["example_id", "score_key", "n_response_tokens", "mean_nll", "ppl", "mean_entropy", "ifd"])
    base = samples[samples.score_key == "base"].merge(pool, on="example_id")
    take = lambda frame, column, ascending: frame.sort_values([column, "example_id"], ascending=[ascending, True]).head(int(np.ceil(0.1 * len(frame))))  # noqa: E731
    if recipe == "random_budget":
        import hashlib

        order = base.assign(h=[hashlib.md5(f"{i}:0".encode()).hexdigest() for i in base.example_id]).sort_values("h")
        return sorted(order[order.n_response_tokens.cumsum() <= PARAMS["random_budget"]["budget_tokens"]].example_id)
    if recipe == "ppl_band":
        ranked = base.assign(distance=(base.ppl.rank(method="min") - 1).div(len(base) - 1).sub(0.5).abs())
        return sorted(take(ranked, "distance", True).example_id)
    if recipe == "entropy_band":
        return sorted(take(base, "mean_entropy", False).example_id)
    if recipe == "ifd":
        scored = base[base.ifd.notna()]
        kept = scored[scored.ifd < 1].sort_values(["ifd", "example_id"], ascending=[False, True])
        return sorted(kept.head(int(np.ceil(0.1 * len(scored)))).example_id)
    if recipe == "longest":
        return sorted(take(base, "n_response_tokens", False).example_id)
    if recipe == "instructdiff":
        content = ["example_id", "score_key", "n_content_tokens", "mean_nll_content", "mean_entropy_content"]
        both = read("sample_scores", content)
        paired = both[both.score_key == "base"].merge(both[both.score_key == "calibrated"], on="example_id", suffixes=("", "_c"))
        paired = paired.merge(pool, on="example_id")
        paired = paired.assign(diff_nll=paired.mean_nll_content - paired.mean_nll_content_c,
                               diff_entropy=paired.mean_entropy_content - paired.mean_entropy_content_c)
        n, budget = len(paired), int(np.floor(0.1 * paired.n_content_tokens.sum()))
        cut = int(np.floor(0.1 * n))
        trimmed = paired.sort_values(["diff_nll", "example_id"]).iloc[cut : n - cut] if 2 * cut < n else paired
        ordered = trimmed.sort_values(["diff_entropy", "example_id"])
        before = ordered.n_content_tokens.cumsum() - ordered.n_content_tokens  # the crossing example is included
        return sorted(ordered[(before < budget) | (np.arange(len(ordered)) == 0)].example_id)
    if recipe == "probe_hard":
        probe = read("probe_scores", ["example_id", "probe_key", "entropy_norm", "is_valid"])
        probe = probe[(probe.probe_key == "probe") & probe.is_valid].merge(pool, on="example_id")
        return sorted(probe[probe.entropy_norm >= probe.entropy_norm.quantile(0.75)].example_id)
    tokens = read("token_scores", ["example_id", "score_key", "variant", "is_response", "entropy", "logprob"])
    tokens = tokens[(tokens.score_key == "base") & (tokens.variant == "chat")].merge(pool, on="example_id")
    if recipe == "eksft_offline":
        pairs = read("pair_scores", ["example_id", "pair_key", "kl"])
        frame = tokens.merge(pairs[pairs.pair_key == "pair"], on="example_id")
        long = frame[["example_id", "is_response", "entropy", "kl"]].explode(["is_response", "entropy", "kl"]).reset_index(drop=True)
        long["pos"] = long.groupby("example_id").cumcount()
        response = long[long.is_response.astype(bool)].copy()
        n = response.groupby("example_id").pos.transform("size")
        k = np.ceil(0.2 * n)
        end = response.groupby("example_id").pos.transform("max")
        h_rank = response.groupby("example_id").entropy.rank(method="first", ascending=False)
        kl_rank = response.groupby("example_id").kl.rank(method="first", ascending=False)
        response["keep"] = (response.pos == end) | ((h_rank > k) & (kl_rank > k))
        masks = response.groupby("example_id").keep.sum()
        return sorted(masks.index)
    raise ValueError(recipe)


def duckdb_rule(root: Path, recipe: str, memory_limit: str, threads: int) -> list[str]:
    from curate.stages.recipes import load_recipe
    from curate.store.sql import connect
    from curate.store.workspace import Workspace

    loaded = load_recipe(recipe)
    params = {name: KEYS[name] for name in loaded.parameters if name in KEYS} | {k: str(v) for k, v in PARAMS.get(recipe, {}).items()}
    con = connect(Workspace(root))
    con.execute(f"set memory_limit = '{memory_limit}'")
    con.execute(f"set threads = {threads}")
    con.execute(f"set temp_directory = '{root / '.duckdb-spill'}'")
    table = con.sql(loaded.sql, params=loaded.bind(params)).to_arrow_table()
    return sorted(table.column("example_id").to_pylist())


def folder_mb(folder: Path) -> float:
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    except OSError:  # a spill file removed while we looked
        return 0.0


def child(root: Path, recipe: str, engine: str, memory_limit: str, threads: int) -> None:
    spill, peak_spill, done = root / ".duckdb-spill", [0.0], threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            peak_spill[0] = max(peak_spill[0], folder_mb(spill))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    libraries = ("duckdb", "curate.store.sql", "curate.stages.recipes") if engine == "duckdb" else ("pandas", "pyarrow.parquet")
    for library in libraries:  # timed apart, so the table can show the rule without the imports
        importlib.import_module(library)
    imported = time.perf_counter()
    ids = duckdb_rule(root, recipe, memory_limit, threads) if engine == "duckdb" else pandas_rule(root, recipe)
    end = time.perf_counter()
    done.set()
    watcher.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: what a machine shared with other jobs distorts least
    print(json.dumps({"seconds": end - start, "rule_seconds": end - imported, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "rss_mb": peak_rss_mb(), "rows": len(ids),
                      "spill_mb": peak_spill[0], "ids_hash": hash(tuple(ids)) & 0xFFFFFFFF}))


def workspace(tmp: Path, examples: int, tokens: int, memory_limit: str, threads: int) -> Path:
    root = tmp / f"ws-{examples}"
    start = time.perf_counter()
    build(root, examples, tokens)
    size = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 2**20
    print(f"synthetic workspace: {examples:,} examples, {examples * tokens:,} tokens per scored model, {size:,.0f} MB of Parquet, "
          f"built in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs, DuckDB memory_limit {memory_limit}, threads {threads}",
          flush=True)
    return root


def measure(root: Path, recipe: str, engine: str, args: argparse.Namespace) -> dict | None:
    return run_child(__file__, [str(root), recipe, engine, "--memory-limit", args.memory_limit, "--threads", str(args.threads)],
                     label=f"{root.name} {recipe} / {engine}")


def compare_pandas(tmp: Path, args: argparse.Namespace) -> None:
    root = workspace(tmp, args.examples, args.tokens_per_example, args.memory_limit, args.threads)
    print("\n| recipe | rows | DuckDB s | pandas s | x faster | imports excluded: DuckDB s | pandas s | x faster | "
          "DuckDB peak RSS MB | pandas peak RSS MB | same rows |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for recipe in [r for r in args.recipes if r in PANDAS_RULES]:
        d, p = measure(root, recipe, "duckdb", args), measure(root, recipe, "pandas", args)
        if d is None or p is None:
            print(f"| {recipe} | failed | | | | | | | | | |", flush=True)
            continue
        same = "yes" if (d["rows"], d["ids_hash"]) == (p["rows"], p["ids_hash"]) else "NO"
        print(f"| {recipe} | {d['rows']:,} | {d['seconds']:.2f} | {p['seconds']:.2f} | {p['seconds'] / d['seconds']:.1f} | "
              f"{d['rule_seconds']:.2f} | {p['rule_seconds']:.2f} | {p['rule_seconds'] / d['rule_seconds']:.1f} | "
              f"{d['rss_mb']:,.0f} | {p['rss_mb']:,.0f} | {same} |", flush=True)


def scale(tmp: Path, args: argparse.Namespace) -> None:
    sizes = sorted({args.baseline, args.examples} - {0})
    results: dict[int, dict[str, dict | None]] = {}
    for size in sizes:  # one workspace at a time on disk
        root = workspace(tmp, size, args.tokens_per_example, args.memory_limit, args.threads)
        results[size] = {}
        for recipe in args.recipes:
            results[size][recipe] = measure(root, recipe, "duckdb", args)
            r = results[size][recipe]
            print(f"  {size:,} {recipe}: " + (f"{r['seconds']:.2f} s ({r['cpu_seconds']:.2f} s CPU), {r['rss_mb']:,.0f} MB, "
                                              f"spill {r['spill_mb']:,.0f} MB" if r else "failed"),
                  flush=True)
        import shutil

        shutil.rmtree(root)
    small, large = sizes[0], sizes[-1]
    head = " | ".join(f"rows {s:,} | s | CPU s | peak RSS MB | spill MB" for s in sizes)
    growth = f" | time x | CPU x | RSS x (for {large / small:g}x the data)" if len(sizes) > 1 else ""
    print(f"\n| recipe | {head}{growth} |\n|---|" + "---|" * (5 * len(sizes) + (3 if len(sizes) > 1 else 0)))
    for recipe in args.recipes:
        cells = []
        for size in sizes:
            r = results[size][recipe]
            cells.append(f"{r['rows']:,} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['rss_mb']:,.0f} | {r['spill_mb']:,.0f}"
                         if r else "failed | | | |")
        a, b = results[small][recipe], results[large][recipe]
        if len(sizes) > 1:
            cells.append(f"{b['seconds'] / a['seconds']:.1f} | {b['cpu_seconds'] / a['cpu_seconds']:.1f} | {b['rss_mb'] / a['rss_mb']:.1f}"
                         if a and b else " | | ")
        print(f"| {recipe} | " + " | ".join(cells) + " |", flush=True)


def bytes_per_token(root: Path) -> None:
    """Disk per scored token of a real workspace: each table's Parquet over the tokens its scoring runs scored."""
    from curate.store.sql import connect
    from curate.store.workspace import Workspace

    ws = Workspace(root)
    con = connect(ws)
    runs, tokens = con.execute("select count(distinct score_key), sum(n_tokens) from token_scores").fetchone()
    examples = con.execute("select count(*) from examples").fetchone()[0]
    print(f"{root}: {examples:,} examples; token_scores: {runs} scoring run(s), {tokens:,} scored tokens "
          f"({tokens / runs:,.0f} per run)\n\n| table | MB on disk | bytes per scored token |\n|---|---|---|")
    total = 0.0
    for name, folder in ws.tables().items():
        size = sum(p.stat().st_size for p in folder.rglob("*.parquet"))
        total += size
        print(f"| {name} | {size / 2**20:,.2f} | {size / tokens:,.1f} |")
    print(f"| all tables | {total / 2**20:,.2f} | {total / tokens:,.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000, help="the size to measure (1000000: ~100M tokens per model)")
    parser.add_argument("--baseline", type=int, default=100_000, help="also measured, side by side (0: none)")
    parser.add_argument("--tokens-per-example", type=int, default=104)
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB memory_limit (it spills to disk beyond it)")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--pandas", action="store_true", help="at --examples only: DuckDB beside pandas, same ids checked")
    parser.add_argument("--tmp", default=None, help="where the synthetic workspaces go (default: the system's temp folder)")
    parser.add_argument("--bytes-per-token", metavar="WORKSPACE", help="only measure a real workspace's disk per scored token")
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "RECIPE", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.child[2], args.memory_limit, args.threads)
        return
    if args.bytes_per_token:
        bytes_per_token(Path(args.bytes_per_token))
        return
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        (compare_pandas if args.pandas else scale)(Path(tmp), args)


if __name__ == "__main__":
    main()
