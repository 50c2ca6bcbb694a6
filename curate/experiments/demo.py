"""``make demo``: the whole pipeline on the bundled SmolLM2 and GSM8K, through the Python API.

ingest -> score (vLLM, IFD) -> probe -> teacher traces for every probed example -> calibrate (on a random
10% of the demo pool, seed 42, merged) -> pair scores (KL) -> every recipe, with the tokens each trains ->
export -> pictures, and the HTML report of one selection -> the canaries: the demo pool holds 20% planted
known-bad rows (replies swapped, final answers changed, words shuffled, replies cut off), and the demo ends
on the share of every recipe's rows and trained tokens that are planted, against the pool's share. Nothing
is trained: the trained comparison is `curate study gsm8k` (and `curate study gsm8k-noisy` on a planted pool).
SmolLM2-135M is also the teacher: it is the only model these machines can load, so the numbers show the
machinery, not a recipe's worth. Every stage resumes: a second run reuses what the first wrote.

    python -m curate.experiments.demo [--workspace demo-workspace] [--full]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from curate.experiments.study.budget import TokenCounter
from curate.experiments.study.plant import (
    PlantSettings,
    count_canaries,
    plant,
    study_predicates,
)
from curate.experiments.study.prepare import examples_table
from curate.experiments.study.report import canary_lines
from curate.experiments.study.run import selection_canaries
from curate.looks.plot import plot
from curate.looks.report import write_report
from curate.models import registry
from curate.models.scorer import open_scorer
from curate.models.teacher import Sampling
from curate.stages.export import export
from curate.stages.ingest import ingest
from curate.stages.pipeline import held, run_generate, run_probe, run_score
from curate.stages.recipes import load_recipe
from curate.stages.select import choose, select
from curate.store.sql import connect
from curate.store.workspace import Workspace
from train.config import TrainConfig
from train.sft import run_calibrate

QUICK = {"where": "split = 'pool' and example_id >= 'f0'", "heldout": 30, "trace_tokens": 200}  # 92 problems, 115 with canaries
FULL = {"where": "split = 'pool'", "heldout": 357, "trace_tokens": 512}
TRAINING = {"epochs": 2, "max_len": 384, "batch_size": 4, "lr": 5e-4}
PLANT = PlantSettings({"swapped": 0.06, "answer_changed": 0.06, "shuffled": 0.04, "truncated": 0.04}, seed=0)  # 20% of the pool


class Steps:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, title: str) -> None:
        print(f"\n=== [{time.perf_counter() - self.started:6.0f} s] {title}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default="demo-workspace")
    parser.add_argument("--full", action="store_true", help="the whole GSM8K pool and held-out split (hours on a 2-core CPU)")
    args = parser.parse_args(argv)
    size = FULL if args.full else QUICK

    step = Steps()
    ws = Workspace(args.workspace)
    step("model and data")
    base_dir = str(registry.pull("smollm2"))
    print(ingest(["gsm8k"], workspace=ws, progress=False).summary())
    step("plant canaries: known-bad copies of 20% of the demo pool (source plant:demo, never held-out)")
    clean, _ = study_predicates(ws, name="demo", pool=size["where"], heldout="split = 'heldout'", planted=False)
    with ws.writing():
        planted = plant(ws, name="demo", pool=clean, settings=PLANT)
    print(f"{len(planted)} planted rows: " + ", ".join(f"{k} {list(planted.values()).count(k)}" for k in PLANT.shares))
    size = {**size, "where": study_predicates(ws, name="demo", pool=size["where"], heldout="split = 'heldout'", planted=True)[0]}

    step(f"score the base model ({size['where']})")
    with held(base_dir, open_scorer, engine="vllm") as base:  # one engine for scoring and the probe
        print(run_score(ws, model=base, where=size["where"], ifd=True).summary())
        step("answer-entropy probe")
        probed = run_probe(ws, model=base, where=size["where"])
        print(probed.summary())

    step("teacher traces for every probed example (complexity stage 1 trains their answers, stage 2 the hard ones' traces)")
    select(ws, load_recipe("probed"), name="probed", params={"probe_key": probed.key})
    sampling = Sampling(n=2, temperature=0.7, max_tokens=size["trace_tokens"])
    traced, chosen = run_generate(ws, teacher=base_dir, options={"max_len": 2048}, source="probed", sampling=sampling,
                                  choose="shortest")
    print(traced.summary())
    print(f"best-of-2 (shortest correct): {chosen} examples")

    step("calibrate: LoRA on a random 10% of the demo pool (seed 42), merged")
    calibrated_dir = ws.root / "models" / "calibrated"
    if not (calibrated_dir / "config.json").is_file():
        pool = examples_table(ws, size["where"], ws.root / "demo" / "pool")
        run_calibrate(TrainConfig(data=str(pool), fraction=0.1, seed=42, model=base_dir, out=str(calibrated_dir), max_len=384))
    step("pair scores: base vs calibrated")
    with held(base_dir, open_scorer, engine="vllm", together=2) as base, \
            held(str(calibrated_dir), open_scorer, engine="vllm", together=2) as calibrated:
        paired = run_score(ws, pair=(base, calibrated), where=size["where"])
        print(paired.summary())
        keys = {"score_key": base.key, "base_key": base.key, "calibrated_key": calibrated.key, "pair_key": paired.key,
                "probe_key": probed.key, "gen_key": traced.key}

    step("every recipe")
    selections = {}
    for path in sorted(Path(load_recipe("full").path).parent.glob("*.sql")):
        recipe = load_recipe(path)
        params = {name: keys[name] for name in recipe.parameters if name in keys}
        if recipe.name in ("ppl_band", "entropy_band"):
            for band in ("min", "mid", "max") if recipe.name == "ppl_band" else ("min", "max"):
                selections[f"{recipe.name}_{band}"] = select(ws, recipe, name=f"{recipe.name}_{band}", params=params | {"band": band})
            continue
        if recipe.name == "random_budget":
            continue  # needs the budget of another selection: below
        selections[recipe.name] = select(ws, recipe, name=recipe.name, params=params)
    budget = selections["instructdiff"].response_tokens or 1
    selections["random_budget"] = select(ws, load_recipe("random_budget"), name="random_budget",
                                         params={"score_key": keys["score_key"], "budget_tokens": str(budget)})

    step("export")
    for name, fmt in (("qtuning_offline", "trl"), ("eksft_offline", "axolotl"), ("complexity_split", "llamafactory"), ("full", "jsonl")):
        print(f"{name} as {fmt}: {export(ws, name, fmt, model=base_dir)}")

    step("pictures and the report of one selection")
    pictures = plot(ws, score_key=keys["score_key"], probe_key=keys["probe_key"])
    report_path = write_report(ws, "qtuning_offline")  # the self-contained HTML report (curate report)
    step("canaries: how much of every recipe's selection is planted")
    summary(ws, base_dir, selections, pictures, report_path, canaries(ws, base_dir, selections, planted, size["where"]))
    print(f"\ndone in {time.perf_counter() - step.started:,.0f} s; workspace: {ws.root}")


def canaries(ws, base_dir: str, selections: dict, planted: dict[str, str], where: str) -> list[str]:
    """The canary table: the demo pool's planted share, then every recipe's (rows and trained tokens)."""
    counter = TokenCounter(base_dir, TRAINING["max_len"])
    pool_ids = [r[0] for r in connect(ws).execute(f"select example_id from examples where {where} order by example_id").fetchall()]
    pool = count_canaries("demo pool (every row)", pool_ids, counter.per_row(choose(ws, load_recipe("full"), {}, keep=pool_ids)), planted)
    return canary_lines([pool, *(selection_canaries(ws, name, [name], planted, counter) for name in sorted(selections))])


def summary(ws, base_dir: str, selections: dict, pictures: list[Path], report_path: Path, canary_table: list[str]) -> None:
    """Per selection its rows and the response tokens the trainer trains on it (token masks included)."""
    import pyarrow.parquet as pq

    counter = TokenCounter(base_dir, TRAINING["max_len"])
    print("\n| selection | rows | stages | response tokens trained |\n|---|---|---|---|")
    for name, report in sorted(selections.items()):
        table = pq.read_table(ws.table_dir(f"selections/{name}") / "part-0.parquet")
        stages = sorted(set(table.column("stage").to_pylist())) if "stage" in table.column_names else []
        tokens = sum(counter.per_row(table).values())
        print(f"| {name} | {report.rows:,} | {', '.join(map(str, stages)) or '-'} | {tokens:,} |")
    print("\n" + "\n".join(canary_table))
    print("\npictures: " + ", ".join(str(p) for p in pictures))
    print(f"report of selection qtuning_offline (open it in a browser): {report_path}")


if __name__ == "__main__":
    main()
