"""The one orchestration path of the model stages: open the model, run the stage, close what was opened.

The CLI, the study's preparation and the demo all call these. A model is given as a name or path (opened
here and closed after the run), as a handle the caller already holds (used, not closed: one engine can
serve several stages), as a served endpoint, or as Ray settings (the replicas open their own engines).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from curate.models.scorer import Scorer, open_scorer, open_served_scorer
from curate.models.served import Endpoint
from curate.models.teacher import (
    Sampling,
    ServedTeacher,
    Teacher,
    open_served_teacher,
    open_teacher,
)
from curate.stages.best_of_n import choose_best
from curate.stages.generate import (
    GenerateReport,
    generate,
    generate_on_ray,
    source_predicate,
)
from curate.stages.probe import ProbeReport, probe, probe_on_ray
from curate.stages.score import ScoreReport, score, score_on_ray, score_pair
from curate.stages.shards import RaySettings
from curate.store.examples import example_predicate
from curate.store.workspace import Workspace


@contextmanager
def held(handle: Any, opener: Any, **options: Any) -> Iterator[Any]:
    """``handle`` itself when it is already open (the caller closes it), else ``opener(handle, **options)``,
    closed when the block ends, whatever happens in it."""
    if not isinstance(handle, str):
        yield handle
        return
    opened = opener(handle, **options)
    try:
        yield opened
    finally:
        opened.close()


def run_score(workspace: Workspace, *, model: str | Scorer | None = None, pair: tuple[Any, Any] | None = None,
              endpoint: Endpoint | None = None, served: dict[str, Any] | None = None, ray: RaySettings | None = None,
              options: dict[str, Any] | None = None, where: str | None = None, ifd: bool = False, shard_size: int = 128,
              progress: bool = True) -> ScoreReport:
    """Score under one model (``model``), a pair (``pair``: base and calibrated, KL), a served model
    (``endpoint``, with ``served``: open_served_scorer's keywords) or Ray replicas (``ray``). ``options``:
    open_scorer's keywords for the models opened here."""
    where = example_predicate(workspace, where)  # checked once, before any model loads
    options = options or {}
    common = {"where": where, "shard_size": shard_size, "progress": progress}
    if sum(x is not None for x in (model, pair, endpoint, ray)) != 1:
        raise ValueError("score one model: give exactly one of a model, a pair (--pair BASE CALIBRATED), an endpoint or --ray")
    if ray is not None:
        return score_on_ray(workspace, ray, ifd=ifd, **common)
    if endpoint is not None:
        return score(workspace, open_served_scorer(endpoint, **(served or {})), ifd=ifd, **common)
    if pair is not None:
        if ifd:
            raise ValueError("--ifd scores one model: run it without --pair (the pair's base rows are the same)")
        with held(pair[0], open_scorer, together=2, **options) as base, held(pair[1], open_scorer, together=2, **options) as other:
            return score_pair(workspace, base, other, **common)
    with held(model, open_scorer, **options) as scorer:
        return score(workspace, scorer, ifd=ifd, **common)


def run_probe(workspace: Workspace, *, model: str | Scorer | None = None, ray: RaySettings | None = None,
              options: dict[str, Any] | None = None, template: str = "auto", where: str | None = None, shard_size: int = 256,
              progress: bool = True) -> ProbeReport:
    """The answer-entropy probe under ``model`` (a name or an open scorer) or on Ray replicas."""
    where = example_predicate(workspace, where)
    common = {"template": template, "where": where, "shard_size": shard_size, "progress": progress}
    if ray is not None:
        return probe_on_ray(workspace, ray, **common)
    if model is None:
        raise ValueError("probe a model: give --model M (or --ray)")
    with held(model, open_scorer, **{"top_k": 0, **(options or {})}) as scorer:
        return probe(workspace, scorer, **common)


def run_generate(workspace: Workspace, *, teacher: str | Teacher | ServedTeacher | None = None, endpoint: Endpoint | None = None,
                 ray: RaySettings | None = None, options: dict[str, Any] | None = None, source: str | None = None,
                 sampling: Sampling = Sampling(), template: str = "auto", batch_size: int = 64, progress: bool = True,
                 choose: str = "shortest", student: dict[str, Any] | Scorer | None = None) -> tuple[GenerateReport, int]:
    """Traces from a teacher (a name, an open handle, an endpoint, or Ray replicas), then best-of-n
    (``choose``; ``student`` for the student-logprob rule: an open scorer, or open_scorer's keywords with
    ``model``); returns the report and how many examples got a chosen trace."""
    source = source_predicate(workspace, source)  # checked once, before the teacher loads
    if choose == "student-logprob" and student is None:
        raise ValueError("--choose student-logprob needs --student MODEL")
    if sum(x is not None for x in (teacher, endpoint, ray)) != 1:
        raise ValueError("give the teacher as --teacher MODEL (in-process), --endpoint URL --served-model NAME, or --ray")
    common = {"source": source, "sampling": sampling, "template": template, "batch_size": batch_size, "progress": progress}
    if ray is not None:
        report = generate_on_ray(workspace, ray, **common)
    elif endpoint is not None:
        report = generate(workspace, open_served_teacher(endpoint), **common)
    else:
        with held(teacher, open_teacher, **(options or {})) as opened:
            report = generate(workspace, opened, **common)
    if choose == "student-logprob":
        judged = dict(student) if isinstance(student, dict) else {"model": student}
        with held(judged.pop("model"), open_scorer, top_k=0, **judged) as judge:
            return report, choose_best(workspace, report.key, rule=choose, student=judge)
    return report, choose_best(workspace, report.key, rule=choose)
