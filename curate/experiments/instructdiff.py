"""``curate instructdiff``: InstructDiff's iterations as one resumable command (arXiv 2601.23006, METHODS.md).

Iteration 1 trains the calibrated model on a random warm-up slice of the pool (seed 42, as the reference);
iteration k >= 2 trains calibrator k **from the base model** on selection k - 1. Each iteration scores the
pool under the fixed base and the new calibrated model (``score --pair``) and selects again with the
``instructdiff`` recipe into ``selections/instructdiff_<k>``. Every step resumes: a finished calibrator
(its folder is written whole) is kept, scoring resumes by run keys, and a selection whose inputs did not
change is rebuilt to the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.models.registry import resolve
from curate.models.scorer import open_scorer
from curate.stages.pipeline import held, run_score
from curate.stages.recipes import load_recipe
from curate.stages.select import select
from curate.store.workspace import Workspace
from train.config import configure
from train.sft import run_calibrate

WARMUP_SEED = 42  # the reference's warm-up slice


@dataclass
class IterationReport:
    iteration: int
    calibrated: str
    trained: bool  # False: the calibrator was there already
    scored: int
    selected: int
    response_tokens: int | None


@dataclass
class LoopReport:
    iterations: list[IterationReport] = field(default_factory=list)

    def summary(self) -> str:
        lines = ["iteration  calibrator                                   trained  scored  selected  response tokens"]
        for it in self.iterations:
            tokens = f"{it.response_tokens:,}" if it.response_tokens is not None else "n/a"
            lines.append(f"{it.iteration:>9}  {it.calibrated[-44:]:<44} {'yes' if it.trained else 'kept':>7}  {it.scored:>6,}  "
                         f"{it.selected:>8,}  {tokens:>15}")
        return "\n".join(lines)


def iterate(workspace: Workspace, *, model: str, iterations: int = 3, warmup_fraction: float = 0.1, split: str = "pool",
            params: dict[str, str] | None = None, training: dict[str, Any] | None = None, engine: str = "vllm",
            dtype: str = "auto", prompt_format: str = "chat", out: str | Path | None = None, progress: bool = True) -> LoopReport:
    """Run (or finish) ``iterations`` InstructDiff iterations; ``training`` overrides the calibrators' settings
    (TrainConfig fields, e.g. ``lora_r=0`` for the reference's full fine-tuning, or a ``preset``)."""

    if iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {iterations}")
    base_dir = resolve(model)
    folder = Path(out) if out else workspace.root / "models" / "instructdiff"
    recipe = load_recipe("instructdiff")
    where = f"split = '{split}'"
    report = LoopReport()
    training = dict(training or {})
    preset = training.pop("preset", None)
    with workspace.writing():
        for k in range(1, iterations + 1):
            calibrated = folder / f"calibrated_{k}"
            trained = not (calibrated / "train_config.json").is_file()
            if trained:
                data = {"data": str(workspace.table_dir("examples")), "split": split, "fraction": warmup_fraction,
                        "seed": WARMUP_SEED} if k == 1 else {"data": str(workspace.table_dir(f"selections/instructdiff_{k - 1}"))}
                run_calibrate(configure({**training, **data, "model": base_dir, "out": str(calibrated)}, preset=preset), progress=progress)
            options = {"engine": engine, "dtype": dtype, "together": 2, "prompt_format": prompt_format}
            with held(base_dir, open_scorer, **options) as base, held(str(calibrated), open_scorer, **options) as scorer:
                scored = run_score(workspace, pair=(base, scorer), where=where, progress=progress)
            chosen = select(workspace, recipe, name=f"instructdiff_{k}",
                            params={"base_key": base.key, "calibrated_key": scorer.key, "split": split, **(params or {})})
            report.iterations.append(IterationReport(k, str(calibrated), trained, scored.examples_scored, chosen.rows,
                                                     chosen.response_tokens))
    return report
