"""``make demo``: the whole pipeline on the bundled SmolLM2 and GSM8K, through the Python API.

ingest -> score (vLLM, IFD) -> probe -> teacher traces for the probe's hard split -> calibrate (LoRA on 10%
of the pool, merged) -> pair scores (KL) -> every recipe -> export -> a short SFT on one selection -> eval
on held-out problems -> one summary table, and the pictures. SmolLM2-135M is also the teacher and the
student: it is the only model these machines can load, so the numbers show the machinery, not a recipe's
worth. Every stage resumes: a second run reuses what the first wrote.

    python -m curate.demo [--workspace demo-workspace] [--full]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

QUICK = {"where": "split = 'pool' and example_id >= 'ec'", "heldout": 30, "max_new_tokens": 200, "trace_tokens": 200}
FULL = {"where": "split = 'pool'", "heldout": 357, "max_new_tokens": 256, "trace_tokens": 512}


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

    from curate import models
    from curate.best_of_n import choose_best
    from curate.export import export
    from curate.generate import Sampling, generate, open_teacher
    from curate.ingest import ingest
    from curate.plot import plot
    from curate.probe import probe
    from curate.recipes import load_recipe
    from curate.score import open_scorer, pair_key, score, score_pair
    from curate.select import select
    from curate.workspace import Workspace
    from train.evaluate import evaluate
    from train.sft import TrainConfig, run_calibrate, run_sft

    step = Steps()
    ws = Workspace(args.workspace)
    step("model and data")
    base_dir = str(models.pull("smollm2"))
    print(ingest(["gsm8k"], workspace=ws, progress=False).summary())

    step(f"score the base model ({size['where']})")
    base = open_scorer(base_dir, engine="vllm")
    print(score(ws, base, where=size["where"], ifd=True).summary())
    step("answer-entropy probe")
    probed = probe(ws, base, where=size["where"])
    print(probed.summary())

    step("teacher traces for the probe's hard split")
    select(ws, load_recipe("probe_hard"), name="probe_hard", params={"probe_key": probed.key})
    teacher = open_teacher(base_dir, max_len=2048)
    traced = generate(ws, teacher, source="probe_hard", sampling=Sampling(n=2, temperature=0.7, max_tokens=size["trace_tokens"]))
    teacher.close()
    print(traced.summary())
    print(f"best-of-2 (shortest correct): {choose_best(ws, traced.key, rule='shortest')} examples")

    step("calibrate: LoRA on a random 10% of the pool, merged")
    calibrated_dir = ws.root / "models" / "calibrated"
    if not (calibrated_dir / "config.json").is_file():
        run_calibrate(TrainConfig(data=str(ws.table_dir("examples")), split="pool", fraction=0.1, model=base_dir,
                                  out=str(calibrated_dir), max_len=512))
    step("pair scores: base vs calibrated")
    calibrated = open_scorer(str(calibrated_dir), engine="vllm")
    print(score_pair(ws, base, calibrated, where=size["where"]).summary())
    base.close()
    calibrated.close()
    pair = pair_key(base, calibrated)
    keys = {"score_key": base.key, "base_key": base.key, "calibrated_key": calibrated.key, "pair_key": pair,
            "probe_key": probed.key, "gen_key": traced.key}

    step("every recipe")
    reports = {}
    for path in sorted(Path(load_recipe("full").path).parent.glob("*.sql")):
        recipe = load_recipe(path)
        params = {name: keys[name] for name in recipe.parameters if name in keys}
        if recipe.name in ("ppl_band", "entropy_band"):
            for band in ("min", "mid", "max") if recipe.name == "ppl_band" else ("min", "max"):
                reports[f"{recipe.name}_{band}"] = select(ws, recipe, name=f"{recipe.name}_{band}", params=params | {"band": band})
            continue
        if recipe.name == "random_budget":
            continue  # needs the budget of another selection: below
        reports[recipe.name] = select(ws, recipe, name=recipe.name, params=params)
    budget = reports["instructdiff"].response_tokens or 1
    reports["random_budget"] = select(ws, load_recipe("random_budget"), name="random_budget",
                                      params={"score_key": keys["score_key"], "budget_tokens": str(budget)})

    step("export")
    for name, fmt in (("qtuning_offline", "trl"), ("eksft_offline", "axolotl"), ("complexity_split", "llamafactory"), ("full", "jsonl")):
        print(f"{name} as {fmt}: {export(ws, name, fmt, model=base_dir)}")

    step("short SFT on the complexity split (answer-only easy/middle + teacher traces for hard)")
    run = ws.root / "runs" / "complexity_split"
    if not (run / "adapter" / "adapter_config.json").is_file():
        run_sft(TrainConfig(data=str(ws.table_dir("selections/complexity_split")), model=base_dir, out=str(run),
                            epochs=2, max_len=512, batch_size=4))
    step(f"evaluate on {size['heldout']} held-out problems (greedy, {size['max_new_tokens']} new tokens)")
    evaluations = {}
    for label, model in (("base SmolLM2", base_dir), ("SFT on complexity_split", str(run / "adapter"))):
        evaluations[label] = evaluate(model, str(ws.table_dir("examples")), split="heldout", limit=size["heldout"],
                                      max_new_tokens=size["max_new_tokens"])
        gc.collect()

    step("pictures")
    pictures = plot(ws, score_key=keys["score_key"], probe_key=keys["probe_key"])
    summary(reports, evaluations, pictures)
    print(f"\ndone in {time.perf_counter() - step.started:,.0f} s; workspace: {ws.root}")


def summary(reports: dict, evaluations: dict, pictures: list[Path]) -> None:
    print("\n| selection | rows | response tokens trained |\n|---|---|---|")
    for name, report in sorted(reports.items()):
        tokens = report.response_tokens
        if report.masked_rows:
            unmasked = (report.response_tokens or 0) - report.mask_tokens_total
            tokens = report.mask_tokens_kept + max(unmasked, 0)
        print(f"| {name} | {report.rows:,} | {tokens:,} |" if tokens is not None else f"| {name} | {report.rows:,} | n/a |")
    print("\n| model | held-out examples | mean answer NLL | accuracy |\n|---|---|---|---|")
    for label, metrics in evaluations.items():
        print(f"| {label} | {metrics['examples']} | {metrics['mean_answer_nll']:.3f} | {metrics['accuracy']:.1%} |")
    print("\npictures: " + ", ".join(str(p) for p in pictures))


if __name__ == "__main__":
    main()
