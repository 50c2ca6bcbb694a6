"""``curate study SPEC``: an equal-budget comparison of selection methods, run and reported with its spread.

The spec (TOML or YAML) names a model, a pool and a held-out set (SQL predicates on ``examples``), a budget
(a share of the full pool's response tokens, or a token count), the arms, the seeds, and the training and
evaluation settings. The study:

1. prepares what the arms' recipes read, each step resumable by its run key: the pool scored under the
   model (``score``), a calibrated model trained on a warm-up slice of the pool and the pair scores
   (``calibrate``), the answer-entropy probe (``probe``) and teacher traces for the probe's hard examples
   (``traces``);
2. brings every arm but ``full`` to the budget, counted as the trainer counts trained tokens (token masks
   included), within ±2%: a recipe with a size knob (``fit = {param, low, high}``) is searched on it by
   bisection, and what is still over is trimmed by a seeded random subset of its rows (``trim``); ``random``
   is a seeded random subset of the pool. An arm that cannot reach the budget is reported as such, and not
   trained or compared;
3. trains each arm x seed with the ``train`` package (two stages where a selection has a ``stage`` column),
   evaluates on the held-out set (mean answer NLL, teacher-forced; exact-match accuracy when asked), and
   writes ``studies/NAME/results.parquet``, ``report.md`` and ``study.png``. A killed study, re-run, redoes
   only the arm x seed runs that have no result.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from curate.experiments.study.budget import Fitted, TokenCounter, fit_arm
from curate.experiments.study.prepare import examples_table, prepare, resolve_model
from curate.experiments.study.report import plot_study, render_report
from curate.experiments.study.spec import StudySpec
from curate.kernel.atomic import write_atomic, write_atomic_text
from curate.kernel.keys import run_key
from curate.kernel.runs import recorded_run
from curate.stages.recipes import RUN_TYPES, load_recipe
from curate.stages.select import choose, read_manifest, select
from curate.store.examples import example_predicate
from curate.store.sql import connect
from curate.store.workspace import Workspace
from train.evaluate import evaluate
from train.sft import configure, run_sft

RESULTS_FILE = "results.parquet"


# ---- the spec -----------------------------------------------------------------------------------------------


# ---- preparing what the recipes read ------------------------------------------------------------------------


# ---- bringing arms to the budget ----------------------------------------------------------------------------


# ---- training and evaluating --------------------------------------------------------------------------------


def train_and_evaluate(spec: StudySpec, selection: Path, out: Path, heldout: Path, seed: int, *, progress: bool) -> dict[str, Any]:
    """Train on a selection (stage 1 then 2 when it has stages) and evaluate on the held-out set."""
    import pyarrow.parquet as pq


    started = time.perf_counter()
    base = resolve_model(spec.model)
    part = selection / "part-0.parquet"
    columns = pq.read_schema(part).names
    stages = sorted(set(pq.read_table(part, columns=["stage"]).column("stage").to_pylist())) if "stage" in columns else [None]
    model, summaries = base, []
    for stage in stages:
        target = out / (f"stage{stage}" if stage is not None else "train")
        summary_file = target / "train_config.json"
        if not summary_file.is_file():
            run_sft(configure({**spec.training, "data": str(selection), "model": model, "out": str(target), "seed": seed,
                               "stage": stage}), progress=progress)
        summaries.append(json.loads(summary_file.read_text()))
        model = str(target / ("model" if (target / "model").is_dir() else "adapter"))
    trained = time.perf_counter() - started
    evaluation = {"max_new_tokens": 256, **spec.evaluation}
    metrics = evaluate(model, str(heldout), limit=spec.heldout_limit, max_new_tokens=evaluation["max_new_tokens"],
                       engine=evaluation.get("engine", "auto"), accuracy=bool(evaluation.get("accuracy", False)))
    return {"train_loss_first": summaries[0]["first_loss"], "train_loss_last": summaries[-1]["last_loss"],
            "heldout_nll": metrics["mean_answer_nll"], "accuracy": metrics.get("accuracy"), "train_seconds": trained,
            "eval_seconds": metrics["seconds"], "model_path": model}


# ---- the study --------------------------------------------------------------------------------------------


def run_study(workspace: Workspace, spec: StudySpec, *, progress: bool = True) -> Path:
    """Run (or finish) a study; returns its folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq


    folder = workspace.root / "studies" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    example_predicate(workspace, spec.pool, option="pool")
    example_predicate(workspace, spec.heldout, option="heldout")
    spec_record = {k: v for k, v in asdict(spec).items()}
    with workspace.writing(), recorded_run(workspace.root, "study", run_key(spec_record), models=[spec.name],
                                           parameters=spec_record) as record:
        keys = prepare(workspace, spec, folder, progress=progress)
        con = connect(workspace)
        pool_ids = [r[0] for r in con.execute(f"select example_id from examples where {spec.pool} order by example_id").fetchall()]
        heldout = examples_table(workspace, spec.heldout, folder / "data" / "heldout")
        counter = TokenCounter(spec.model, int(spec.training.get("max_len", 1024)))
        full_tokens = sum(counter.per_row(choose(workspace, load_recipe("full"), {}, keep=pool_ids)).values())
        budget = spec.budget_tokens or int(round(full_tokens * (spec.budget_share or 0.25)))
        results = []
        for arm in spec.arms:
            recipe = load_recipe(arm.recipe or "full")
            params = dict(arm.params)
            for name, parameter in recipe.parameters.items():  # run parameters come from the prepared runs
                if parameter.kind in RUN_TYPES and name not in params and keys.parameter(name, parameter.kind):
                    params[name] = keys.parameter(name, parameter.kind)
            seeds = spec.seeds[: spec.full_seeds] if arm.name == "full" else spec.seeds
            for seed in seeds:
                run_dir = folder / "runs" / arm.name / f"seed{seed}"
                result_file = run_dir / "result.json"
                if result_file.is_file():
                    results.append(json.loads(result_file.read_text()))
                    continue
                if arm.name == "full":
                    fitted = Fitted("full", None, "fitted", len(pool_ids), full_tokens, "every pool example", params, pool_ids)
                else:
                    fitted = fit_arm(workspace, arm, params, budget, pool_ids, counter, seed)
                row = {"study": spec.name, "arm": arm.name, "seed": seed, "status": fitted.status, "rows": fitted.rows,
                       "trained_tokens": fitted.trained_tokens, "budget_tokens": budget if arm.name != "full" else full_tokens,
                       "deviation": fitted.trained_tokens / (budget if arm.name != "full" else full_tokens) - 1, "fit": fitted.how,
                       "params": json.dumps(fitted.params, sort_keys=True), "selection": None, "selection_key": None}
                if fitted.status == "fitted":
                    selection = f"study_{spec.name}_{arm.name}" + (f"_s{seed}" if fitted.seed is not None else "")
                    select(workspace, recipe, name=selection, params=fitted.params, keep=fitted.keep, keep_note=fitted.how)
                    selection_dir = workspace.table_dir(f"selections/{selection}")
                    row |= {"selection": selection,
                            "selection_key": read_manifest(pq.read_table(selection_dir / "part-0.parquet")).get("key")}
                    row |= train_and_evaluate(spec, selection_dir, run_dir, heldout, seed, progress=progress)
                run_dir.mkdir(parents=True, exist_ok=True)
                write_atomic_text(result_file, json.dumps(row, default=str) + "\n")  # this arm x seed is done
                results.append(row)
        base_row = _base_reference(spec, folder, heldout)
        frame = pa.Table.from_pylist(results + [base_row])
        write_atomic(folder / RESULTS_FILE, lambda tmp: pq.write_table(frame, tmp))
        report = render_report(spec, results, base_row, budget, full_tokens)
        write_atomic_text(folder / "report.md", report)
        plot_study(spec, results, base_row, budget, folder / "study.png")
        record.counts = {"runs": len(results), "budget_tokens": budget}
    return folder


def _base_reference(spec: StudySpec, folder: Path, heldout: Path) -> dict[str, Any]:
    """The untrained model on the held-out set (kept once per study)."""

    path = folder / "runs" / "base" / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    evaluation = {"max_new_tokens": 256, **spec.evaluation}
    metrics = evaluate(resolve_model(spec.model), str(heldout), limit=spec.heldout_limit, max_new_tokens=evaluation["max_new_tokens"],
                       engine=evaluation.get("engine", "auto"), accuracy=bool(evaluation.get("accuracy", False)))
    row = {"study": spec.name, "arm": "base (no training)", "seed": None, "status": "reference", "rows": 0, "trained_tokens": 0,
           "heldout_nll": metrics["mean_answer_nll"], "accuracy": metrics.get("accuracy"), "eval_seconds": metrics["seconds"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(path, json.dumps(row) + "\n")
    return row


# ---- the report -------------------------------------------------------------------------------------------



