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
from curate.models.teacher import Sampling, open_teacher
from curate.stages.best_of_n import choose_best
from curate.stages.generate import generate
from curate.stages.probe import probe
from curate.stages.recipes import load_recipe
from curate.stages.score import pair_key, score, score_pair
from curate.stages.select import select
from curate.store.examples import example_predicate
from curate.store.sql import connect
from curate.store.workspace import Workspace
from train.sft import configure, run_calibrate


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


def prepare(workspace: Workspace, spec: StudySpec, folder: Path, *, progress: bool) -> Keys:
    """Score, calibrate and pair-score, probe, and make traces as the spec's ``prepare`` asks (resumable)."""

    steps = spec.prepare
    keys = Keys()
    options = {"engine": spec.engine, "dtype": spec.dtype}
    if steps.get("score", True) or steps.get("calibrate") or steps.get("probe"):
        base = open_scorer(spec.model, **options)
        if steps.get("score", True):
            keys.score = score(workspace, base, where=spec.pool, progress=progress).key
        if steps.get("probe"):
            keys.probe = probe(workspace, base, where=spec.pool, progress=progress).key
        base.close()
    if steps.get("calibrate"):
        settings = dict(steps["calibrate"]) if isinstance(steps["calibrate"], dict) else {}
        calibrated = folder / "calibrated"
        if not (calibrated / "train_config.json").is_file():
            pool = pool_table(workspace, spec.pool, folder)
            run_calibrate(configure({"data": str(pool), "model": resolve_model(spec.model), "out": str(calibrated),
                                     "fraction": settings.pop("fraction", 0.1), "seed": settings.pop("seed", 42), **settings}),
                          progress=progress)
        base, other = (open_scorer(m, together=2, **options) for m in (spec.model, str(calibrated)))
        score_pair(workspace, base, other, where=spec.pool, progress=progress)
        keys.score, keys.calibrated, keys.pair = base.key, other.key, pair_key(base, other)
        base.close()
        other.close()
    if steps.get("traces"):
        settings = dict(steps["traces"]) if isinstance(steps["traces"], dict) else {}
        if keys.probe is None:
            raise ValueError("prepare.traces generates for the probe's hard examples: set prepare.probe = true too")
        hard = f"study_{spec.name}_probe_hard"
        select(workspace, load_recipe("probe_hard"), name=hard, params={"probe_key": keys.probe, "split": settings.pop("split", "pool")})
        teacher = open_teacher(settings.pop("teacher", spec.model), dtype=spec.dtype, max_len=settings.pop("max_len", 2048))
        sampling = Sampling(n=settings.pop("n", 1), temperature=settings.pop("temperature", 0.0), max_tokens=settings.pop("max_tokens", 256))
        keys.traces = generate(workspace, teacher, source=hard, sampling=sampling, progress=progress).key
        teacher.close()
        choose_best(workspace, keys.traces, rule="shortest")
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
