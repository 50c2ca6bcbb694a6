"""``curate study SPEC``: an equal-budget comparison of selection methods, run and reported with its spread.

The spec (TOML or YAML) names a model, a pool and a held-out set (SQL predicates on ``examples``), a budget
(a share of the full pool's response tokens, or a token count), the arms, the seeds, the training and
evaluation settings, and planted canaries (``[plant]``, curate.experiments.study.plant). The study:

0. plants its canaries into its own pool (once), and narrows its pool and held-out predicates so that no
   other study's planted rows, and none of its own in the held-out set, are ever read;

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
   writes ``studies/NAME/results.parquet``, ``heldout.parquet`` (per held-out example and arm x seed: answer
   NLL, correctness), ``canaries.md``, ``report.md`` (with the paired statistics of
   curate.experiments.study.stats) and ``study.png``. A killed study, re-run, redoes only the arm x seed runs
   that have no result. Without training (``train=False``, ``--no-train``) it stops after the selections and
   writes their canary report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from curate.experiments.study.budget import Fitted, TokenCounter, fit_arm
from curate.experiments.study.plant import (
    Canaries,
    count_canaries,
    plant,
    study_predicates,
)
from curate.experiments.study.prepare import examples_table, prepare, resolve_model
from curate.experiments.study.report import plot_study, render_canaries, render_report
from curate.experiments.study.spec import StudySpec
from curate.experiments.study.stats import comparisons
from curate.kernel.atomic import write_atomic, write_atomic_text
from curate.kernel.keys import run_key
from curate.kernel.runs import recorded_run
from curate.stages.recipes import RUN_TYPES, load_recipe
from curate.stages.select import choose, read_manifest, select
from curate.store.sql import connect
from curate.store.workspace import Workspace
from train.evaluate import evaluate_examples
from train.config import configure
from train.sft import run_sft

RESULTS_FILE = "results.parquet"
HELDOUT_FILE = "heldout.parquet"  # per held-out example, per arm x seed: answer NLL and correctness
CANARIES_FILE = "canaries.md"
BASE = "base (no training)"


def evaluate_model(spec: StudySpec, model: str, heldout: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The held-out metrics of one model, and its per-example values (train.evaluate.evaluate_examples)."""
    evaluation = {"max_new_tokens": 256, **spec.evaluation}
    return evaluate_examples(model, str(heldout), limit=spec.heldout_limit, max_new_tokens=evaluation["max_new_tokens"],
                             engine=evaluation.get("engine", "auto"), accuracy=bool(evaluation.get("accuracy", False)))


def train_and_evaluate(spec: StudySpec, selection: Path, out: Path, heldout: Path, seed: int, *,
                       progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train on a selection (stage 1 then 2 when it has stages) and evaluate on the held-out set: the result
    row's fields, and the per-example values."""
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
    metrics, per_example = evaluate_model(spec, model, heldout)
    return ({"train_loss_first": summaries[0]["first_loss"], "train_loss_last": summaries[-1]["last_loss"],
             "heldout_nll": metrics["mean_answer_nll"], "accuracy": metrics.get("accuracy"), "train_seconds": trained,
             "eval_seconds": metrics["seconds"], "model_path": model}, per_example)


# ---- the study --------------------------------------------------------------------------------------------


def run_study(workspace: Workspace, spec: StudySpec, *, progress: bool = True, train: bool = True) -> Path:
    """Run (or finish) a study; returns its folder. ``train=False`` stops after the selections: it writes them
    and their canary report (``canaries.md``), and trains and evaluates nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = workspace.root / "studies" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    planting = spec.planting
    clean_pool, heldout_where = study_predicates(workspace, name=spec.name, pool=spec.pool, heldout=spec.heldout, planted=False)
    spec_record = {k: v for k, v in asdict(spec).items()}
    with workspace.writing(), recorded_run(workspace.root, "study", run_key(spec_record), models=[spec.name],
                                           parameters=spec_record | {"train": train}) as record:
        planted = plant(workspace, name=spec.name, pool=clean_pool, settings=planting) if planting else {}
        pool_where, _ = study_predicates(workspace, name=spec.name, pool=spec.pool, heldout=spec.heldout, planted=bool(planted))
        spec = replace(spec, pool=pool_where, heldout=heldout_where)  # what every step below reads: enforced, not by convention
        keys = prepare(workspace, spec, folder, progress=progress)
        con = connect(workspace)
        pool_ids = [r[0] for r in con.execute(f"select example_id from examples where {spec.pool} order by example_id").fetchall()]
        heldout = examples_table(workspace, spec.heldout, folder / "data" / "heldout")
        counter = TokenCounter(spec.model, int(spec.training.get("max_len", 1024)))
        pool_counts = counter.per_row(choose(workspace, load_recipe("full"), {}, keep=pool_ids))
        full_tokens = sum(pool_counts.values())
        budget = spec.budget_tokens or int(round(full_tokens * (spec.budget_share or 0.25)))
        results, per_example = [], []
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
                    row = json.loads(result_file.read_text())
                    results.append(row)
                    if train:
                        per_example += _per_example(spec, run_dir, row, heldout)
                    continue
                if arm.name == "full":
                    fitted = Fitted("full", None, "fitted", len(pool_ids), full_tokens, "every pool example", params, pool_ids)
                else:
                    fitted = fit_arm(workspace, arm, params, budget, pool_ids, counter, seed)
                row = {"study": spec.name, "arm": arm.name, "seed": seed, "status": fitted.status, "rows": fitted.rows,
                       "trained_tokens": fitted.trained_tokens, "budget_tokens": budget if arm.name != "full" else full_tokens,
                       "deviation": fitted.trained_tokens / (budget if arm.name != "full" else full_tokens) - 1, "fit": fitted.how,
                       "params": json.dumps(fitted.params, sort_keys=True), "selection": None, "selection_key": None}
                values: list[dict[str, Any]] = []
                if fitted.status == "fitted":
                    selection = f"study_{spec.name}_{arm.name}" + (f"_s{seed}" if fitted.seed is not None else "")
                    select(workspace, recipe, name=selection, params=fitted.params, keep=fitted.keep, keep_note=fitted.how)
                    selection_dir = workspace.table_dir(f"selections/{selection}")
                    row |= {"selection": selection,
                            "selection_key": read_manifest(pq.read_table(selection_dir / "part-0.parquet")).get("key")}
                    if train:
                        trained, values = train_and_evaluate(spec, selection_dir, run_dir, heldout, seed, progress=progress)
                        row |= trained
                results.append(row)
                if not train:
                    continue  # no result file: a later run with training trains it
                run_dir.mkdir(parents=True, exist_ok=True)
                per_example += _keep_per_example(run_dir, spec.name, arm.name, seed, values)
                write_atomic_text(result_file, json.dumps(row, default=str) + "\n")  # this arm x seed is done
        canaries = canary_table(workspace, results, planted, pool_ids, pool_counts, counter)
        write_atomic_text(folder / CANARIES_FILE, render_canaries(spec, canaries, budget))
        if not train:
            record.counts = {"selections": len({r["selection"] for r in results if r["selection"]}), "budget_tokens": budget}
            return folder
        base_row, base_values = _base_reference(spec, folder, heldout)
        per_example += base_values
        frame = pa.Table.from_pylist(results + [base_row])
        write_atomic(folder / RESULTS_FILE, lambda tmp: pq.write_table(frame, tmp))
        examples = pa.Table.from_pylist(per_example, schema=_heldout_schema())
        write_atomic(folder / HELDOUT_FILE, lambda tmp: pq.write_table(examples, tmp))
        paired = comparisons(per_example, spec.arm_names)
        report = render_report(spec, results, base_row, budget, full_tokens, paired=paired, canaries=canaries)
        write_atomic_text(folder / "report.md", report)
        plot_study(spec, results, base_row, budget, folder / "study.png", paired=paired)
        record.counts = {"runs": len(results), "budget_tokens": budget, "heldout_rows": len(per_example)}
    return folder


def canary_table(workspace: Workspace, results: list[dict], planted: dict[str, str], pool_ids: list[str], pool_counts: dict[str, int],
                 counter: TokenCounter) -> list[Canaries]:
    """The pool's planted share, then each arm's over its distinct selections (rows and trained tokens)."""
    found = [count_canaries("pool (every row)", pool_ids, pool_counts, planted)]
    for arm in dict.fromkeys(r["arm"] for r in results):
        names = sorted({r["selection"] for r in results if r["arm"] == arm and r.get("selection")})
        if names:
            found.append(selection_canaries(workspace, arm, names, planted, counter))
    return found


def selection_canaries(workspace: Workspace, label: str, selections: list[str], planted: dict[str, str], counter: TokenCounter) -> Canaries:
    """The planted rows and trained tokens of selections (by name), pooled under one label."""
    import pyarrow.parquet as pq

    counts = []
    for name in selections:
        table = pq.read_table(workspace.table_dir(f"selections/{name}") / "part-0.parquet")
        counts.append(count_canaries(label, table.column("example_id").to_pylist(), counter.per_row(table), planted))
    return Canaries.pooled(label, counts)


def _heldout_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("study", pa.string()), ("arm", pa.string()), ("seed", pa.int64()), ("example_id", pa.string()),
                      ("answer_nll", pa.float64()), ("correct", pa.bool_())])


def _keep_per_example(run_dir: Path, study: str, arm: str, seed: int | None, values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write one run's per-example values beside its result (before it: result.json marks the run done)."""
    rows = [{"study": study, "arm": arm, "seed": seed, **v} for v in values]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic_text(run_dir / "heldout.json", json.dumps(rows) + "\n")
    return rows


def _per_example(spec: StudySpec, run_dir: Path, row: dict[str, Any], heldout: Path) -> list[dict[str, Any]]:
    """A finished run's per-example values; a run finished before they were kept is evaluated again."""
    path = run_dir / "heldout.json"
    if path.is_file():
        return json.loads(path.read_text())
    if row.get("heldout_nll") is None or not row.get("model_path") or not Path(row["model_path"]).exists():
        return []
    _, values = evaluate_model(spec, row["model_path"], heldout)
    return _keep_per_example(run_dir, spec.name, row["arm"], row["seed"], values)


def _base_reference(spec: StudySpec, folder: Path, heldout: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The untrained model on the held-out set (kept once per study), and its per-example values."""

    run_dir = folder / "runs" / "base"
    path = run_dir / "result.json"
    if path.is_file():
        row = json.loads(path.read_text())
        return row, _per_example(spec, run_dir, row | {"model_path": resolve_model(spec.model)}, heldout)
    metrics, values = evaluate_model(spec, resolve_model(spec.model), heldout)
    row = {"study": spec.name, "arm": BASE, "seed": None, "status": "reference", "rows": 0, "trained_tokens": 0,
           "heldout_nll": metrics["mean_answer_nll"], "accuracy": metrics.get("accuracy"), "eval_seconds": metrics["seconds"]}
    values = _keep_per_example(run_dir, spec.name, BASE, None, values)
    write_atomic_text(path, json.dumps(row) + "\n")
    return row, values
