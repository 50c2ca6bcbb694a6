"""``make demo``: the whole pipeline on the bundled SmolLM2 and GSM8K, through the Python API.

ingest -> score (vLLM, IFD) -> probe -> teacher traces for every probed example -> calibrate (on a random
10% of the demo pool, seed 42, merged) -> pair scores (KL) -> every recipe, with the tokens each trains ->
export -> a small study: the two-stage complexity pipeline against random data at the same trained-token
budget, one seed, evaluated on held-out problems -> pictures, and the HTML report of one selection.
SmolLM2-135M is also the teacher and the student: it is the only model these machines can load, so the
numbers show the machinery, not a recipe's worth (the bundled study, `curate study gsm8k`, is the
comparison). Every stage resumes: a second run reuses what the first wrote.

    python -m curate.experiments.demo [--workspace demo-workspace] [--full]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from curate.experiments.study.budget import TokenCounter
from curate.experiments.study.prepare import examples_table
from curate.experiments.study.run import run_study
from curate.experiments.study.spec import Arm, StudySpec
from curate.looks.plot import plot
from curate.looks.report import write_report
from curate.models import registry
from curate.models.scorer import open_scorer
from curate.models.teacher import Sampling, open_teacher
from curate.stages.best_of_n import choose_best
from curate.stages.export import export
from curate.stages.generate import generate
from curate.stages.ingest import ingest
from curate.stages.probe import probe
from curate.stages.recipes import load_recipe
from curate.stages.score import pair_key, score, score_pair
from curate.stages.select import choose, select
from curate.store.workspace import Workspace
from train.sft import TrainConfig, run_calibrate

QUICK = {"where": "split = 'pool' and example_id >= 'ec'", "heldout": 30, "trace_tokens": 200}
FULL = {"where": "split = 'pool'", "heldout": 357, "trace_tokens": 512}
TRAINING = {"epochs": 2, "max_len": 384, "batch_size": 4, "lr": 5e-4}


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

    step(f"score the base model ({size['where']})")
    base = open_scorer(base_dir, engine="vllm")
    print(score(ws, base, where=size["where"], ifd=True).summary())
    step("answer-entropy probe")
    probed = probe(ws, base, where=size["where"])
    print(probed.summary())
    base.close()

    step("teacher traces for every probed example (complexity stage 1 trains their answers, stage 2 the hard ones' traces)")
    select(ws, load_recipe("probed"), name="probed", params={"probe_key": probed.key})
    teacher = open_teacher(base_dir, max_len=2048)
    sampling = Sampling(n=2, temperature=0.7, max_tokens=size["trace_tokens"])
    traced = generate(ws, teacher, source="probed", sampling=sampling)
    teacher.close()
    print(traced.summary())
    print(f"best-of-2 (shortest correct): {choose_best(ws, traced.key, rule='shortest')} examples")

    step("calibrate: LoRA on a random 10% of the demo pool (seed 42), merged")
    calibrated_dir = ws.root / "models" / "calibrated"
    if not (calibrated_dir / "config.json").is_file():
        pool = examples_table(ws, size["where"], ws.root / "demo" / "pool")
        run_calibrate(TrainConfig(data=str(pool), fraction=0.1, seed=42, model=base_dir, out=str(calibrated_dir), max_len=384))
    step("pair scores: base vs calibrated")
    base = open_scorer(base_dir, engine="vllm", together=2)
    calibrated = open_scorer(str(calibrated_dir), engine="vllm", together=2)
    print(score_pair(ws, base, calibrated, where=size["where"]).summary())
    keys = {"score_key": base.key, "base_key": base.key, "calibrated_key": calibrated.key, "pair_key": pair_key(base, calibrated),
            "probe_key": probed.key, "gen_key": traced.key}
    base.close()
    calibrated.close()

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

    step("a small study: the two-stage complexity pipeline vs random data at its trained-token budget, one seed")
    study = small_study(ws, base_dir, size, keys)

    step("pictures and the report of one selection")
    pictures = plot(ws, score_key=keys["score_key"], probe_key=keys["probe_key"])
    report_path = write_report(ws, "qtuning_offline")  # the self-contained HTML report (curate report)
    summary(ws, base_dir, selections, study, pictures, report_path)
    print(f"\ndone in {time.perf_counter() - step.started:,.0f} s; workspace: {ws.root}")


def small_study(ws, base_dir: str, size: dict, keys: dict) -> Path:
    """random vs complexity_split at the complexity split's own trained tokens: the study machinery, small."""

    complexity = {"probe_key": keys["probe_key"], "gen_key": keys["gen_key"]}
    counter = TokenCounter(base_dir, TRAINING["max_len"])
    budget = sum(counter.per_row(choose(ws, load_recipe("complexity_split"), complexity)).values())
    spec = StudySpec(name="demo", model=base_dir, pool=size["where"], heldout="split = 'heldout'", heldout_limit=size["heldout"],
                     arms=[Arm("random"), Arm("complexity", "complexity_split", complexity)], seeds=[0],
                     budget_share=None, budget_tokens=budget, training=TRAINING, prepare={"score": False}, full_seeds=0)
    return run_study(ws, spec)


def summary(ws, base_dir: str, selections: dict, study: Path, pictures: list[Path], report_path: Path) -> None:
    """Per selection its rows and the response tokens the trainer trains on it (token masks included)."""
    import pyarrow.parquet as pq


    counter = TokenCounter(base_dir, TRAINING["max_len"])
    print("\n| selection | rows | stages | response tokens trained |\n|---|---|---|---|")
    for name, report in sorted(selections.items()):
        table = pq.read_table(ws.table_dir(f"selections/{name}") / "part-0.parquet")
        stages = sorted(set(table.column("stage").to_pylist())) if "stage" in table.column_names else []
        tokens = sum(counter.per_row(table).values())
        print(f"| {name} | {report.rows:,} | {', '.join(map(str, stages)) or '-'} | {tokens:,} |")
    print("\n" + (study / "report.md").read_text())
    print("pictures: " + ", ".join(str(p) for p in [*pictures, study / "study.png"]))
    print(f"report of selection qtuning_offline (open it in a browser): {report_path}")


if __name__ == "__main__":
    main()
