"""``curate generate``: chain-of-thought traces from a teacher model through vLLM, checked against the
reference answers.

Every request (example, teacher fingerprint, template version, sampling parameters, sample index) has a
hash, ``trace_id``; requests go to the teacher a shard of examples at a time (in-process vLLM, a served
endpoint, or Ray replicas: ``ShardGenerator`` either way), each shard lands as one atomic Parquet part, and
a re-run sends only the requests whose ``trace_id`` is not in ``traces`` yet. With temperature > 0 each request
carries its own seed derived from its ``trace_id``, so a resumed run samples what the uninterrupted one would.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from curate.kernel.answers import grade
from curate.kernel.chat_tokens import encode_text
from curate.kernel.keys import run_key
from curate.models.teacher import (
    Sampling,
    ServedTeacher,
    Teacher,
    TeacherCard,
    open_teacher,
    teacher_card,
)
from curate.stages.prompts import PromptTemplate, pick, templates_for
from curate.stages.records import example_fields
from curate.stages.runner import CountProgress, Plan, StageRun, run_stage
from curate.stages.shards import (
    Output,
    RaySettings,
    check_replica_key,
    replica_precision,
)
from curate.store import schema
from curate.store.examples import Predicate, described, done_ids, example_predicate
from curate.store.score_tables import table_from_columns
from curate.store.workspace import Workspace

_SELECTION_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class GenerateReport:
    key: str
    requests_sent: int = 0
    already_done: int = 0
    completion_tokens: int = 0
    correct: int = 0
    truncated: int = 0
    no_answer: int = 0
    failed: int = 0  # requests that failed after their retries (in trace_errors; the next run sends them again)
    attempts: int = 0  # requests made, retries included
    usage_prompt_tokens: int = 0
    usage_completion_tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"generation key       {self.key}",
            f"traces generated     {self.requests_sent:>8,}  ({self.completion_tokens:,} tokens, {rate:,.0f} tokens/s)",
            f"already generated    {self.already_done:>8,}",
            f"correct              {self.correct:>8,}",
            f"cut off (max tokens) {self.truncated:>8,}",
            f"no answer found      {self.no_answer:>8,}",
            f"examples skipped     {sum(self.skipped.values()):>8,}",
        ]
        if self.failed or self.attempts > self.requests_sent:
            lines += [f"retries              {self.attempts - self.requests_sent - self.failed:>8,}",
                      f"failed (retried next run) {self.failed:>3,}"]
        lines.append(f"usage: prompt tokens {self.usage_prompt_tokens:,}, completion tokens {self.usage_completion_tokens:,}")
        lines += [f"  {reason:<26}{count:>6,}" for reason, count in sorted(self.skipped.items())]
        return "\n".join(lines)


@dataclass(frozen=True)
class GenerateSpec:
    """Everything that decides the traces of one generation run; its hash is the generation key. The number
    of samples is not part of it: asking for more samples later extends the same run."""

    teacher: dict[str, str]  # ModelIdentity.spec(): fingerprint and precision
    max_len: int  # the teacher's context limit: it caps how long a trace may get
    engine_options: dict[str, Any]
    templates: dict[str, str]  # answer kind -> template version
    sampling: dict[str, Any]  # temperature, top_p, max_tokens, seed


def generation_spec(teacher: Teacher | ServedTeacher | TeacherCard, templates: dict[str, PromptTemplate], sampling: Sampling) -> GenerateSpec:
    return GenerateSpec(teacher.identity.spec(), teacher.max_len, teacher.options.identity(),
                        {k: t.version for k, t in sorted(templates.items())},
                        {k: v for k, v in vars(sampling).items() if k != "n"})


def generation_key(teacher: Teacher | ServedTeacher | TeacherCard, templates: dict[str, PromptTemplate], sampling: Sampling) -> str:
    return run_key(generation_spec(teacher, templates, sampling))


def source_predicate(workspace: Workspace, source: str | None) -> Predicate | None:
    """``--from``: the name of a selection in the workspace, a SQL predicate on ``examples``, or a whole query
    that returns example_id (checked before any model loads; a checked one comes back as it is)."""
    if source and not isinstance(source, Predicate) and _SELECTION_NAME.fullmatch(source) \
            and workspace.has_table(f"selections/{source}"):
        return Predicate(f'example_id in (select example_id from "selections_{source}")', source)
    return example_predicate(workspace, source, option="--from")


@dataclass
class _Request:
    trace_id: str
    example_id: str
    sample_index: int
    seed: int
    template: PromptTemplate
    kind: str
    prompt: list[dict[str, str]]
    prompt_ids: list[int]
    reference_answer: str | None


def generate(
    workspace: Workspace,
    teacher: Teacher | ServedTeacher | TeacherCard,
    *,
    source: str | None = None,
    sampling: Sampling = Sampling(),
    template: str = "auto",
    batch_size: int = 64,
    progress: bool = True,
    ray: RaySettings | None = None,
) -> GenerateReport:
    """Generate ``sampling.n`` traces per example picked by ``source`` (selection name or SQL filter), about
    ``batch_size`` requests per engine call and written part; with ``ray``, on its replicas (``teacher`` is
    then the card of what they open: see ``generate_on_ray``)."""
    where = source_predicate(workspace, source)
    templates = templates_for(template, purpose="cot")
    spec = generation_spec(teacher, templates, sampling)
    key = run_key(spec)
    report = GenerateReport(key)
    parameters = {"spec": spec, "teacher": teacher.model, "path": teacher.identity.path, "n": sampling.n, "from": described(source),
                  "engine_version": teacher.version,
                  "templates": {k: {"name": t.name, "version": t.version, "text": t.text} for k, t in templates.items()}}
    run = StageRun("generate", key, teacher.identity.names(), parameters, {teacher.model: teacher.identity.fingerprint},
                   ("traces",), ("example_id", "messages", "reference_answer", "meta"),
                   max(1, batch_size // sampling.n))  # examples per shard: about batch_size requests

    def plan(con: Any, picked: list[tuple[str, int]]) -> Plan:
        done = done_ids(workspace, "traces", "gen_key", key, id_column="trace_id")
        finished = _finished_examples(con, workspace, key, sampling.n)
        report.already_done = sampling.n * sum(i in finished for i, _ in picked)
        started = time.perf_counter()
        bar = CountProgress(tqdm(total=max(len(picked) * sampling.n - len(done), 0), desc="generate", unit=" trace",
                                 disable=not progress, file=sys.stderr), "requests",
                            lambda r: f"{r.completion_tokens / (time.perf_counter() - started):,.0f} gen tok/s")
        manifest = {"sampling": vars(sampling)}
        if ray is not None:
            return Plan(finished, bar, job=GenerateJob(ray.opener, template, sampling, key, done), manifest=manifest)
        return Plan(finished, bar, work=ShardGenerator(teacher, templates, sampling, key, done), manifest=manifest)  # type: ignore[arg-type]

    return run_stage(workspace, run, report, predicate=where, plan=plan, ray=ray)


def _requests(
    teacher: Teacher, templates: dict[str, PromptTemplate], sampling: Sampling, key: str, row: dict[str, Any], report: GenerateReport
) -> list[_Request]:
    reference = row["reference_answer"]
    fields = example_fields(row["meta"])
    kind, template = pick(templates, reference, fields)
    try:
        prompt = template.apply(row["messages"], fields)
    except ValueError:
        report.skipped["no_user_turn"] += 1
        return []
    # a served teacher without a local tokenizer applies its own template: the length check is then its
    prompt_ids = encode_text(teacher.tokenizer, template.render_prompt(teacher.tokenizer, prompt)) if teacher.tokenizer else []
    if len(prompt_ids) >= teacher.max_len:
        report.skipped["longer_than_context"] += 1
        return []
    requests = []
    for index in range(sampling.n):
        trace_id = run_key({"gen_key": key, "example_id": row["example_id"], "sample_index": index})
        seed = (int(trace_id[:8], 16) + sampling.seed) % (2**31)
        requests.append(_Request(trace_id, row["example_id"], index, seed, template, kind, prompt, prompt_ids, reference))
    return requests


def generate_on_ray(workspace: Workspace, settings: RaySettings, *, source: str | None = None, sampling: Sampling = Sampling(),
                    template: str = "auto", batch_size: int = 64, progress: bool = True) -> GenerateReport:
    """``generate`` on a Ray cluster's replicas, each opening ``settings.opener`` (open_teacher's keywords)."""
    source_predicate(workspace, source)
    templates_for(template, purpose="cot")  # a bad template fails before any engine starts
    card = teacher_card(**settings.opener, precision=replica_precision(settings))  # no engine opened here
    return generate(workspace, card, source=source, sampling=sampling, template=template, batch_size=batch_size,
                    progress=progress, ray=settings)


def _finished_examples(con: Any, workspace: Workspace, key: str, n: int) -> set[str]:
    """Examples that have all ``n`` traces under ``key`` (left out of the shards)."""
    if not workspace.has_table("traces"):
        return set()
    rows = con.execute(
        "select example_id from traces where gen_key = ? and sample_index < ? group by example_id having count(*) = ?",
        [key, n, n]).fetchall()
    return {i for (i,) in rows}


@dataclass
class ShardGenerator:
    """A shard of example rows -> its traces (and the errors of requests that failed after their retries):
    the same function here and on every Ray replica. ``done``: the trace ids already written."""

    teacher: Teacher | ServedTeacher
    templates: dict[str, PromptTemplate]
    sampling: Sampling
    key: str
    done: set[str]

    def __call__(self, shard: list[dict[str, Any]]) -> Output:
        report = GenerateReport(self.key)
        requests: list[_Request] = []
        for row in shard:
            made = _requests(self.teacher, self.templates, self.sampling, self.key, row, report)
            report.already_done += sum(r.trace_id in self.done for r in made)
            requests += [r for r in made if r.trace_id not in self.done]
        outputs = _send(self.teacher, self.sampling, self.key, requests, report) if requests else []
        counts = {k: v for k, v in vars(report).items() if k not in ("key", "seconds")}
        return outputs, counts | {"requests": len(requests)}


@dataclass(frozen=True)
class GenerateJob:
    """What a Ray replica needs to generate (picklable): it opens its own engine and checks the run key."""

    opener: dict[str, Any]
    template: str
    sampling: Sampling
    key: str
    done: set[str]

    def open(self) -> ShardGenerator:
        teacher = open_teacher(**self.opener)
        templates = templates_for(self.template, purpose="cot")
        check_replica_key(generation_key(teacher, templates, self.sampling), self.key)
        return ShardGenerator(teacher, templates, self.sampling, self.key, self.done)


def _send(teacher: Teacher | ServedTeacher, sampling: Sampling, key: str, requests: list[_Request],
          report: GenerateReport) -> list[tuple[str, pa.Table]]:
    """One engine call (or one round of served requests) for ``requests``: the traces and trace_errors rows."""
    completions = teacher.complete(requests, sampling)
    answered = [(r, c) for r, c in zip(requests, completions) if c.error is None]
    failed = [(r, c) for r, c in zip(requests, completions) if c.error is not None]
    outputs = []
    if answered:
        outputs.append(("traces", _trace_table(teacher, sampling, key, [r for r, _ in answered], [c for _, c in answered], report)))
    if failed:  # recorded with their errors; they stay out of traces, so the next run sends them again
        rows = [{"trace_id": r.trace_id, "example_id": r.example_id, "gen_key": key, "error": c.error, "attempts": c.attempts,
                 "at": time.time()} for r, c in failed]
        outputs.append(("trace_errors", pa.Table.from_pylist(rows, schema=schema.TRACE_ERRORS)))
    report.requests_sent += len(answered)
    report.failed += len(failed)
    report.attempts += sum(c.attempts for c in completions)
    report.usage_prompt_tokens += sum(c.prompt_tokens for _, c in answered)
    report.usage_completion_tokens += sum(c.completion_tokens for _, c in answered)
    return outputs


def _trace_table(
    teacher: Teacher, sampling: Sampling, key: str, requests: list[_Request], completions: list[Any], report: GenerateReport
) -> pa.Table:
    texts = [r.template.prefill + c.text for r, c in zip(requests, completions)]  # the reply as the model wrote it
    graded = [grade(text, r.reference_answer, kind=r.kind) for r, text in zip(requests, texts)]
    truncated = [c.finish_reason == "length" for c in completions]
    n_completion = [c.completion_tokens for c in completions]
    report.completion_tokens += sum(n_completion)
    report.correct += sum(bool(ok) for _, ok in graded)
    report.truncated += sum(truncated)
    report.no_answer += sum(answer is None for answer, _ in graded)
    n = len(requests)
    columns = {
        "trace_id": [r.trace_id for r in requests],
        "example_id": [r.example_id for r in requests],
        "gen_key": [key] * n,
        "teacher": [teacher.model] * n,
        "teacher_hash": [teacher.identity.fingerprint] * n,
        "engine_version": [teacher.version] * n,
        "dtype": [teacher.identity.dtype] * n,
        "template": [r.template.name for r in requests],
        "template_version": [r.template.version for r in requests],
        "temperature": [sampling.temperature] * n,
        "top_p": [sampling.top_p] * n,
        "max_tokens": [sampling.max_tokens] * n,
        "seed": [r.seed for r in requests],
        "sample_index": [r.sample_index for r in requests],
        "prompt": [r.prompt for r in requests],
        "text": texts,
        "extracted_answer": [answer for answer, _ in graded],
        "reference_answer": [r.reference_answer for r in requests],
        "is_correct": [ok for _, ok in graded],
        "finish_reason": [str(c.finish_reason) for c in completions],
        "truncated": truncated,
        "n_prompt_tokens": [c.prompt_tokens for c in completions],
        "n_completion_tokens": n_completion,
    }
    return table_from_columns(columns, schema.TRACES)
