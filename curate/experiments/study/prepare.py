"""What a study's arms read, prepared before any arm is fitted, each step resumable by its run key: the pool
scored under the model, a calibrated model and the pair scores, the answer-entropy probe, teacher traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curate.experiments.study.spec import StudySpec
from curate.kernel.atomic import write_atomic
from curate.models.registry import resolve
from curate.models.scorer import open_scorer
from curate.models.teacher import Sampling
from curate.stages.pipeline import held, run_generate, run_probe, run_score
from curate.stages.recipes import load_recipe
from curate.stages.select import select
from curate.store.examples import example_predicate
from curate.store.sql import connect
from curate.store.workspace import Workspace
from train.config import configure
from train.sft import run_calibrate


@dataclass
class Keys:
    """The run keys the arms' recipes take, filled into their run parameters by kind."""

    score: str | None = None
    calibrated: str | None = None
    pair: str | None = None
    probe: str | None = None
    traces: str | None = None

    def parameter(self, name: str, kind: str) -> str | None:
        if kind == "score_run":
            return self.calibrated if name.startswith("calibrated") else self.score
        return {"pair_run": self.pair, "probe_run": self.probe, "generate_run": self.traces}.get(kind)


# a recipe's need (curate.stages.recipes.NEEDS) -> the [prepare] step that makes it
STEP_OF_NEED = {"scores": "score", "entropy": "score", "ifd": "score", "calibrated": "calibrate", "kl": "calibrate",
                "probe": "probe", "traces": "traces"}


def planned_steps(spec: StudySpec) -> dict[str, object]:
    """The spec's ``[prepare]`` with what its arms' recipes need (their ``needs:`` headers) added: ``score`` (with
    ``ifd`` when an arm reads IFD) and ``probe`` are turned on; ``calibrate`` and ``traces`` train or generate with
    settings of their own, so an arm that needs them without them refuses the spec, as does a step it needs that the
    spec turned off. Checked before any model loads."""

    steps = dict(spec.prepare)
    for arm in spec.arms:
        recipe = load_recipe(arm.recipe) if arm.recipe else None
        for need in recipe.needs if recipe else ():
            step = STEP_OF_NEED[need]
            if need in ("scores", "entropy") and steps.get("calibrate"):
                continue  # the pair run scores the base model too
            reason = f"study {spec.name}: arm {arm.name!r} (recipe {recipe.name}) needs {need}"
            if steps.get(step) is False or (need == "ifd" and steps.get("ifd") is False):
                raise ValueError(f"{reason}, and [prepare] sets {'ifd' if need == 'ifd' else step} = false: remove that line, "
                                 "or the arm")
            if step in ("score", "probe"):
                steps.setdefault(step, True)
            elif not steps.get(step):
                example = "{ fraction = 0.1, seed = 42 }" if step == "calibrate" else "{ n = 1, temperature = 0.0, max_tokens = 256 }"
                raise ValueError(f"{reason}: add `{step} = {example}` (or `{step} = true`) under [prepare]")
            if need == "ifd":
                steps["ifd"] = True
    if steps.get("traces") and steps.get("probe") is False:
        raise ValueError(f"study {spec.name}: prepare.traces generates for the probed examples: set prepare.probe = true too")
    if steps.get("traces"):
        steps.setdefault("probe", True)
    return steps


def prepare(workspace: Workspace, spec: StudySpec, folder: Path, *, progress: bool) -> Keys:
    """Score, calibrate and pair-score, probe, and make traces as the spec's ``prepare`` asks, and what its arms'
    recipes need (``planned_steps``: refused before any model loads when a step is missing; resumable)."""

    steps = planned_steps(spec)
    keys = Keys()
    options = {"engine": spec.engine, "dtype": spec.dtype}
    if steps.get("score", True) or steps.get("probe"):
        with held(spec.model, open_scorer, **options) as base:  # one engine for both stages
            if steps.get("score", True):
                keys.score = run_score(workspace, model=base, where=spec.pool, ifd=bool(steps.get("ifd")), progress=progress).key
            if steps.get("probe"):
                keys.probe = run_probe(workspace, model=base, where=spec.pool, progress=progress).key
    if steps.get("calibrate"):
        settings = dict(steps["calibrate"]) if isinstance(steps["calibrate"], dict) else {}
        calibrated = folder / "calibrated"
        if not (calibrated / "train_config.json").is_file():
            pool = pool_table(workspace, spec.pool, folder)
            run_calibrate(configure({"data": str(pool), "model": resolve_model(spec.model), "out": str(calibrated),
                                     "fraction": settings.pop("fraction", 0.1), "seed": settings.pop("seed", 42), **settings}),
                          progress=progress)
        with held(spec.model, open_scorer, together=2, **options) as base, \
                held(str(calibrated), open_scorer, together=2, **options) as other:
            keys.pair = run_score(workspace, pair=(base, other), where=spec.pool, progress=progress).key
            keys.score, keys.calibrated = base.key, other.key
    if steps.get("traces"):
        settings = dict(steps["traces"]) if isinstance(steps["traces"], dict) else {}
        if keys.probe is None:
            raise ValueError("prepare.traces generates for the probed examples: set prepare.probe = true too")
        probed = f"study_{spec.name}_probed"  # every validly probed example: stage 1 trains the teacher's answers too
        select(workspace, load_recipe("probed"), name=probed, params={"probe_key": keys.probe, "split": settings.pop("split", "pool")})
        teacher = settings.pop("teacher", spec.model)
        options = {"dtype": spec.dtype, "max_len": settings.pop("max_len", 2048)}
        sampling = Sampling(n=settings.pop("n", 1), temperature=settings.pop("temperature", 0.0), max_tokens=settings.pop("max_tokens", 256))
        traced, _ = run_generate(workspace, teacher=teacher, options=options, source=probed, sampling=sampling, progress=progress,
                                 choose="shortest")
        keys.traces = traced.key
    return keys


def resolve_model(model: str) -> str:
    return resolve(model)


def pool_table(workspace: Workspace, predicate: str, folder: Path) -> Path:
    """The pool's examples (what a calibrator trains a slice of), in ``data/pool``."""
    return examples_table(workspace, predicate, folder / "data" / "pool")


def examples_table(workspace: Workspace, predicate: str, folder: Path) -> Path:
    """The examples a predicate picks, as one Parquet part in ``folder`` (a table of the workspace)."""
    import pyarrow.parquet as pq

    table = connect(workspace).sql(f"select * from examples where {example_predicate(workspace, predicate)} order by example_id").to_arrow_table()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "part-0.parquet", lambda tmp: pq.write_table(table, tmp))
    return folder / "part-0.parquet"
