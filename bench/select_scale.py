"""Recipes at scale: synthetic scores for 100,000 examples / 10M+ tokens, every recipe through DuckDB (what
`curate select` runs) side by side with a straightforward pandas implementation of the same rule, in one run.

    .venv/bin/python bench/select_scale.py [--examples 100000] [--tokens-per-example 104] [--memory-limit 1GB]

Each (recipe, engine) runs in its own process, so peak RSS is its own; wall time covers importing the
libraries, reading the Parquet and computing the rows (not writing them), and is also shown without the
imports. Both engines must return the same example ids (checked).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from children import peak_rss_mb, run_child

RECIPES = ("full", "random_budget", "ppl_band", "entropy_band", "ifd", "longest", "instructdiff", "complexity_split",
           "probe_hard", "eksft_offline", "qtuning_offline")
PARAMS = {"random_budget": {"budget_tokens": 500_000}, "ppl_band": {"band": "mid"}, "entropy_band": {"band": "max"}}


# ---- synthetic workspace ----------------------------------------------------------------------------------

def build(root: Path, examples: int, tokens: int) -> None:
    import pyarrow as pa

    from curate.store import schema
    from curate.store.workspace import Workspace

    rng = np.random.default_rng(0)
    ws = Workspace(root)
    ids = [f"{i:016x}" for i in range(examples)]
    prompt = tokens // 3  # the first third is the prompt, the rest the response (last one = end of turn)
    is_response = np.zeros(tokens, dtype=bool)
    is_response[prompt:] = True

    def lists(values: np.ndarray, kind) -> pa.Array:
        offsets = pa.array(np.arange(0, examples * tokens + 1, tokens, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=kind))

    def scored(values: np.ndarray) -> pa.Array:  # element 0 of every list is null, like the real tables
        mask = np.zeros((examples, tokens), dtype=bool)
        mask[:, 0] = True
        offsets = pa.array(np.arange(0, examples * tokens + 1, tokens, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32(), mask=mask.reshape(-1)))

    def write(name: str, columns: dict, table_schema) -> None:
        arrays = [columns[f.name] if f.name in columns else pa.nulls(examples, f.type) for f in table_schema]
        table = pa.Table.from_arrays(arrays, schema=table_schema)
        for part, begin in enumerate(range(0, examples, 10_000)):  # parts, as stages write them
            ws.write_part(name, table.slice(begin, 10_000), schema=table_schema)

    message = pa.array([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * examples, type=pa.list_(schema.MESSAGE))
    write("examples", {"example_id": pa.array(ids), "source": pa.array(["synthetic"] * examples), "split": pa.array(["pool"] * examples),
                       "messages": message, "reference_answer": pa.array([str(i % 100) for i in range(examples)])}, schema.EXAMPLES)
    response_flags = lists(np.tile(is_response, examples), pa.bool_())
    token_ids = lists(rng.integers(0, 49152, examples * tokens).astype(np.int32), pa.int32())
    for key, shift in (("base", 0.0), ("calibrated", -0.1)):
        logprob = -rng.gamma(1.0, 1.0 + shift, examples * tokens).astype(np.float32)
        entropy = rng.gamma(2.0, 0.8, examples * tokens).astype(np.float32)
        write("token_scores", {"example_id": pa.array(ids), "score_key": pa.array([key] * examples), "variant": pa.array(["chat"] * examples),
                               "n_tokens": pa.array([tokens] * examples, pa.int32()), "token_ids": token_ids, "is_response": response_flags,
                               "logprob": scored(logprob), "entropy": scored(entropy)}, schema.TOKEN_SCORES)
        nll = -logprob.reshape(examples, tokens)[:, prompt:].mean(axis=1)
        mean_entropy = entropy.reshape(examples, tokens)[:, prompt:].mean(axis=1)
        write("sample_scores", {"example_id": pa.array(ids), "score_key": pa.array([key] * examples),
                                "n_response_tokens": pa.array([tokens - prompt] * examples, pa.int32()), "mean_nll": pa.array(nll, pa.float64()),
                                "ppl": pa.array(np.exp(nll), pa.float64()), "mean_entropy": pa.array(mean_entropy, pa.float64()),
                                "ifd": pa.array(rng.uniform(0.3, 1.2, examples))}, schema.SAMPLE_SCORES)
    write("pair_scores", {"example_id": pa.array(ids), "pair_key": pa.array(["pair"] * examples), "base_key": pa.array(["base"] * examples),
                          "calibrated_key": pa.array(["calibrated"] * examples), "is_response": response_flags,
                          "kl": scored(rng.gamma(0.5, 0.1, examples * tokens).astype(np.float32))}, schema.PAIR_SCORES)
    write("probe_scores", {"example_id": pa.array(ids), "probe_key": pa.array(["probe"] * examples), "entropy_norm": pa.array(rng.uniform(0, 0.5, examples)),
                           "is_valid": pa.array(rng.uniform(size=examples) < 0.95), "reference_answer": pa.array([str(i % 100) for i in range(examples)])},
          schema.PROBE_SCORES)
    write("best_traces", {"example_id": pa.array(ids), "gen_key": pa.array(["gen"] * examples), "rule": pa.array(["shortest"] * examples),
                          "text": pa.array(["step by step #### 1"] * examples), "is_correct": pa.array(rng.uniform(size=examples) < 0.6),
                          "truncated": pa.array([False] * examples)}, schema.BEST_TRACES)


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
        calibrated = samples[samples.score_key == "calibrated"]
        paired = base.merge(calibrated, on="example_id", suffixes=("", "_c"))
        paired = paired.assign(delta_nll=paired.mean_nll_c - paired.mean_nll, delta_entropy=paired.mean_entropy - paired.mean_entropy_c)
        n = len(paired)
        cut = int(np.floor(0.1 * n))
        trimmed = paired.sort_values(["delta_nll", "example_id"]).iloc[cut : n - cut]
        return sorted(trimmed.sort_values(["delta_entropy", "example_id"]).head(int(np.ceil(0.1 * n))).example_id)
    if recipe in ("complexity_split", "probe_hard"):
        probe = read("probe_scores", ["example_id", "probe_key", "entropy_norm", "is_valid"])
        probe = probe[(probe.probe_key == "probe") & probe.is_valid].merge(pool, on="example_id")
        high = probe.entropy_norm.quantile(0.75)  # easy and middle are both kept: only the hard cut matters here
        if recipe == "probe_hard":
            return sorted(probe[probe.entropy_norm >= high].example_id)
        traces = read("best_traces", ["example_id", "gen_key", "rule", "is_correct", "truncated"])
        good = traces[(traces.gen_key == "gen") & (traces.rule == "shortest") & (traces.is_correct != False) & ~traces.truncated]  # noqa: E712
        hard = probe.entropy_norm >= high
        return sorted(probe[~hard | probe.example_id.isin(good.example_id)].example_id)
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
    if recipe == "qtuning_offline":
        n = len(base)
        ppl_rank = (base.ppl.rank(method="min") - 1) / (n - 1)
        h_rank = (base.mean_entropy.rank(method="min") - 1) / (n - 1)
        best = None
        for alpha in np.arange(1, 50) / 100:
            q2 = (ppl_rank > 1 - alpha) & (h_rank <= alpha)
            q4 = (ppl_rank <= alpha) & (h_rank > 1 - alpha)
            if (q2 | q4).sum() <= 0.25 * n:
                best = (q2, q4)
        q2, q4 = best
        q2_ids = base[q2].example_id
        long = tokens[tokens.example_id.isin(q2_ids)][["example_id", "is_response", "logprob"]].explode(["is_response", "logprob"]).reset_index(drop=True)
        long["pos"] = long.groupby("example_id").cumcount()
        response = long[long.is_response.astype(bool)].copy()
        response["ppl"] = np.exp(-response.logprob.astype(float))
        grouped = response.groupby("example_id").ppl
        before, after = grouped.shift(1).fillna(response.ppl), grouped.shift(-1).fillna(response.ppl)
        response["score"] = 0.5 * response.ppl + 0.5 * (before + after)
        response["rank"] = response.sort_values(["score", "pos"]).groupby("example_id").cumcount() + 1
        response.groupby("example_id")["rank"].max()
        return sorted(base[q2 | q4].example_id)
    raise ValueError(recipe)


def duckdb_rule(root: Path, recipe: str, memory_limit: str) -> list[str]:
    from curate.stages.recipes import load_recipe
    from curate.store.sql import connect
    from curate.store.workspace import Workspace

    loaded = load_recipe(recipe)
    params = {name: KEYS[name] for name in loaded.parameters if name in KEYS} | {k: str(v) for k, v in PARAMS.get(recipe, {}).items()}
    con = connect(Workspace(root))
    con.execute(f"set memory_limit = '{memory_limit}'")
    con.execute(f"set temp_directory = '{root / '.duckdb-spill'}'")
    table = con.sql(loaded.sql, params=loaded.bind(params)).to_arrow_table()
    return sorted(table.column("example_id").to_pylist())


def child(root: Path, recipe: str, engine: str, memory_limit: str) -> None:
    start = time.perf_counter()
    libraries = ("duckdb", "curate.store.sql", "curate.stages.recipes") if engine == "duckdb" else ("pandas", "pyarrow.parquet")
    for library in libraries:  # timed apart, so the table can show the rule without the imports
        importlib.import_module(library)
    imported = time.perf_counter()
    ids = duckdb_rule(root, recipe, memory_limit) if engine == "duckdb" else pandas_rule(root, recipe)
    end = time.perf_counter()
    print(json.dumps({"seconds": end - start, "rule_seconds": end - imported, "rss_mb": peak_rss_mb(), "rows": len(ids),
                      "ids_hash": hash(tuple(ids)) & 0xFFFFFFFF}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--tokens-per-example", type=int, default=104)
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB memory_limit (it spills to disk beyond it)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "RECIPE", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.child[2], args.memory_limit)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        start = time.perf_counter()
        build(root, args.examples, args.tokens_per_example)
        size = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 2**20
        print(f"synthetic workspace: {args.examples:,} examples, {args.examples * args.tokens_per_example:,} tokens per scored model, "
              f"{size:,.0f} MB of Parquet, built in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs, DuckDB memory_limit {args.memory_limit}\n",
              flush=True)
        print("| recipe | rows | DuckDB s | pandas s | x faster | imports excluded: DuckDB s | pandas s | x faster | "
              "DuckDB peak RSS MB | pandas peak RSS MB | same rows |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for recipe in args.recipes:
            results = {engine: run_child(__file__, [str(root), recipe, engine, "--memory-limit", args.memory_limit], label=f"{recipe} / {engine}")
                       for engine in ("duckdb", "pandas")}
            d, p = results["duckdb"], results["pandas"]
            if d is None or p is None:
                print(f"| {recipe} | failed | | | | | | | | | |", flush=True)
                continue
            same = "yes" if (d["rows"], d["ids_hash"]) == (p["rows"], p["ids_hash"]) else "NO"
            print(f"| {recipe} | {d['rows']:,} | {d['seconds']:.2f} | {p['seconds']:.2f} | {p['seconds'] / d['seconds']:.1f} | "
                  f"{d['rule_seconds']:.2f} | {p['rule_seconds']:.2f} | {p['rule_seconds'] / d['rule_seconds']:.1f} | "
                  f"{d['rss_mb']:,.0f} | {p['rss_mb']:,.0f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
