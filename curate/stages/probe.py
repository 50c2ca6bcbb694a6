"""``curate probe``: the answer-entropy probe of complexity-aware fine-tuning (arXiv 2506.21220).

The model is asked for the answer only (a template per answer kind), and the distribution of its first
answer token is read at the last prompt position, through the same engine and output head as scoring:
greedy token = argmax, entropy over the full vocabulary. The token is correct when it is the first token of
the reference answer as the model would write it. How well low entropy predicts correctness is reported as
the ROC AUC of (1 - H / max H), max H = log(vocab size), over the valid answers (the paper drops invalid
ones; they are kept in the table, flagged). Resumable like scoring: rows carry a probe key.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from curate.kernel.chat_tokens import encode_text
from curate.kernel.keys import run_key
from curate.models.head import position_signals
from curate.models.scorer import Scorer, ScorerCard, open_scorer, scorer_card
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
from curate.store.examples import described, done_ids, example_predicate
from curate.store.score_tables import table_from_columns
from curate.store.workspace import Workspace

_NUMERIC_START = re.compile(r"[-$]?\d+|[-$]")
_CHOICE = re.compile(r"[A-J]")


@dataclass
class ProbeReport:
    key: str
    probed: int = 0
    already_done: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    rows: int = 0  # all rows under this key, this run and earlier ones
    valid: int = 0
    correct: int = 0
    not_sure: int = 0  # "0" answers to the reference multiple-choice prompt (left out, as the reference does)
    roc_auc: float | None = None
    auc_by_category: dict[str, float | None] = field(default_factory=dict)

    def summary(self) -> str:
        auc = f"{self.roc_auc:.3f}" if self.roc_auc is not None else "n/a (needs both correct and wrong answers)"
        lines = [
            f"probe key            {self.key}",
            f"examples probed      {self.probed:>8,}  ({self.seconds:.1f} s)",
            f"already probed       {self.already_done:>8,}",
            f"skipped              {sum(self.skipped.values()):>8,}",
            *(f"  {reason:<26}{count:>6,}" for reason, count in sorted(self.skipped.items())),
            f"rows under this key  {self.rows:>8,}",
            f"valid answers        {self.valid:>8,}",
            f"correct first token  {self.correct:>8,}  ({self.correct / max(self.valid, 1):.1%} of valid)",
            f"ROC AUC (1 - H/maxH) {auc}",
        ]
        if self.not_sure:
            lines.insert(-2, f"not sure (\"0\")      {self.not_sure:>8,}")
        lines += [f"  {category:<26}{value:.3f}" if value is not None else f"  {category:<26}n/a"
                  for category, value in self.auc_by_category.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class ProbeSpec:
    """Everything that decides the rows of one probe run; its hash is the probe key."""

    model: dict[str, str]  # ModelIdentity.spec(): fingerprint and precision
    engine: str
    max_len: int
    head_candidates: int
    engine_options: dict[str, Any]
    templates: dict[str, str]  # answer kind -> template version (hash of its text)


def probe_spec(scorer: Scorer | ScorerCard, templates: dict[str, PromptTemplate]) -> ProbeSpec:
    return ProbeSpec(scorer.spec.model, scorer.engine.name, scorer.engine.max_len, scorer.spec.head_candidates,
                     scorer.options.identity(), {k: t.version for k, t in sorted(templates.items())})


def probe_key(scorer: Scorer | ScorerCard, templates: dict[str, PromptTemplate]) -> str:
    return run_key(probe_spec(scorer, templates))


def probe(
    workspace: Workspace,
    scorer: Scorer | ScorerCard,
    *,
    template: str = "auto",
    where: str | None = None,
    shard_size: int = 256,
    progress: bool = True,
    ray: RaySettings | None = None,
) -> ProbeReport:
    """Probe every example with a reference answer (or those the SQL filter ``where`` picks); with ``ray``,
    on its replicas (``scorer`` is then the card of what they open: see ``probe_on_ray``)."""
    predicate = example_predicate(workspace, where)
    templates = templates_for(template, purpose="answer_only")
    spec = probe_spec(scorer, templates)
    key = run_key(spec)
    report = ProbeReport(key)
    parameters = {"spec": spec, "model": scorer.model, "path": scorer.identity.path, "where": described(where),
                  "templates": {k: {"name": t.name, "version": t.version, "text": t.text} for k, t in templates.items()}}
    run = StageRun("probe", key, scorer.identity.names(), parameters, {scorer.model: scorer.identity.fingerprint},
                   ("probe_scores",), ("example_id", "messages", "reference_answer", "meta"), shard_size)

    def plan(con: Any, picked: list[tuple[str, int]]) -> Plan:
        done = done_ids(workspace, "probe_scores", "probe_key", key)
        report.already_done = sum(i in done for i, _ in picked)
        bar = CountProgress(tqdm(total=len(picked) - report.already_done, desc="probe", unit=" ex", disable=not progress,
                                 file=sys.stderr), "examples")
        if ray is not None:
            return Plan(done, bar, job=ProbeJob(ray.opener, template, key))
        return Plan(done, bar, work=ShardProber(scorer, templates, key))  # type: ignore[arg-type]

    return run_stage(workspace, run, report, predicate=predicate, plan=plan, ray=ray, finish=lambda con: _summarise(workspace, report))


def probe_on_ray(workspace: Workspace, settings: RaySettings, *, template: str = "auto", where: str | None = None,
                 shard_size: int = 256, progress: bool = True) -> ProbeReport:
    """``probe`` on a Ray cluster's replicas, each opening ``settings.opener`` (open_scorer's keywords)."""
    example_predicate(workspace, where)
    templates_for(template, purpose="answer_only")  # a bad template fails before any engine starts
    card = scorer_card(**settings.opener, precision=replica_precision(settings))  # no engine opened here
    return probe(workspace, card, template=template, where=where, shard_size=shard_size, progress=progress, ray=settings)


@dataclass
class ShardProber:
    """A shard of example rows -> its probe rows: the same function here and on every Ray replica."""

    scorer: Scorer
    templates: dict[str, PromptTemplate]
    key: str

    def __call__(self, shard: list[dict[str, Any]]) -> Output:
        report = ProbeReport(self.key)
        asked = [a for a in (_ask(self.scorer, self.templates, row, report) for row in shard) if a is not None]
        table = _probe_table(self.scorer, self.key, asked) if asked else None
        outputs = [("probe_scores", table)] if table is not None else []
        return outputs, {"probed": table.num_rows if table is not None else 0, "skipped": report.skipped, "examples": len(shard)}


@dataclass(frozen=True)
class ProbeJob:
    """What a Ray replica needs to probe (picklable): it opens its own engine and checks the run key."""

    opener: dict[str, Any]
    template: str
    key: str

    def open(self) -> ShardProber:
        scorer = open_scorer(**self.opener)
        templates = templates_for(self.template, purpose="answer_only")
        check_replica_key(probe_key(scorer, templates), self.key)
        return ShardProber(scorer, templates, self.key)


@dataclass
class _Asked:
    example_id: str
    template: PromptTemplate
    prompt_ids: list[int]
    reference_answer: str  # what the model should answer: the number, the letter, or the option number
    expected_id: int
    kind: str
    options: int  # how many numbered options the prompt showed (kind "options")
    category: str | None


def option_number(reference: str) -> str:
    """The 1-based option number of a reference letter (A -> 1): the answer the reference prompt asks for."""
    return str(ord(reference.strip().upper()) - ord("A") + 1)


def _ask(scorer: Scorer, templates: dict[str, PromptTemplate], row: dict[str, Any], report: ProbeReport) -> _Asked | None:
    reference = row["reference_answer"]
    if reference is None or not reference.strip():
        report.skipped["no_reference_answer"] += 1
        return None
    fields = example_fields(row["meta"])
    kind, template = pick(templates, reference, fields)
    try:
        messages = template.apply(row["messages"], fields)
    except ValueError:
        report.skipped["no_user_turn"] += 1
        return None
    if kind == "options":
        reference = option_number(reference)
    tokenizer = scorer.tokenizer
    prompt = template.render_prompt(tokenizer, messages)
    prompt_ids = encode_text(tokenizer, prompt)
    if len(prompt_ids) >= scorer.engine.max_len:
        report.skipped["longer_than_context"] += 1
        return None
    separator = " " if template.prefill and not template.prefill.endswith((" ", "\n")) else ""
    answered = encode_text(tokenizer, prompt + separator + reference.strip())
    if answered[: len(prompt_ids)] == prompt_ids and len(answered) > len(prompt_ids):
        answer_ids = answered[len(prompt_ids) :]
    else:  # the answer merged with the prompt's last token: fall back to the answer tokenized alone
        answer_ids = encode_text(tokenizer, separator + reference.strip())
    # A tokenizer that writes " 18" as " ", "1", "8" would make the probe read a space: whitespace-only
    # tokens before the answer go into the prompt, so the probed token is the answer's first real one.
    while len(answer_ids) > 1 and not tokenizer.decode([answer_ids[0]]).strip():
        prompt_ids.append(answer_ids.pop(0))
    expected = answer_ids[0]
    category = fields.get("category") or fields.get("subject")
    return _Asked(row["example_id"], template, prompt_ids, reference.strip(), expected, kind,
                  len(fields.get("choices") or []), str(category) if category else None)


def first_token_distribution(scorer: Scorer, hidden: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Entropy (nats) and argmax token of the next-token distribution after each prompt, from the prompts'
    final hidden states."""
    import torch

    last = torch.stack([h[-1] for h in hidden]).to(scorer.head.weight.device)
    with torch.inference_mode():
        signals = position_signals(last, scorer.head, top_k=1)
    return signals.entropy.double().numpy(), signals.top_ids[:, 0].numpy()


def _probe_table(scorer: Scorer, key: str, asked: list[_Asked]) -> pa.Table | None:
    """The probe rows of the asked examples; one whose served request failed gets none (asked again next run)."""
    hidden = scorer.engine.hidden_states([a.prompt_ids for a in asked])
    asked = [a for a, h in zip(asked, hidden) if h is not None]
    if not asked:
        return None
    entropy, greedy = first_token_distribution(scorer, [h for h in hidden if h is not None])
    texts = [scorer.tokenizer.decode([int(t)]) for t in greedy]
    expected_texts = [scorer.tokenizer.decode([a.expected_id]) for a in asked]
    valid = [_is_valid(text, a) for text, a in zip(texts, asked)]
    correct = [
        bool(ok and (int(t) == a.expected_id or _same_answer_start(text, expected, a.kind)))
        for ok, t, a, text, expected in zip(valid, greedy, asked, texts, expected_texts)
    ]
    n = len(asked)
    columns = {
        "example_id": [a.example_id for a in asked],
        "probe_key": [key] * n,
        "model": [scorer.model] * n,
        "model_hash": [scorer.identity.fingerprint] * n,
        "engine": [scorer.engine.name] * n,
        "template": [a.template.name for a in asked],
        "template_version": [a.template.version for a in asked],
        "n_prompt_tokens": [len(a.prompt_ids) for a in asked],
        "entropy": entropy.tolist(),
        "entropy_norm": (entropy / math.log(scorer.head.vocab_size)).tolist(),
        "token_id": [int(t) for t in greedy],
        "token_text": texts,
        "reference_answer": [a.reference_answer for a in asked],
        "expected_token_id": [a.expected_id for a in asked],
        "is_valid": valid,
        "is_correct": correct,
        "category": [a.category for a in asked],
        "not_sure": [a.kind == "options" and text.strip() == "0" for a, text in zip(asked, texts)],
    }
    return table_from_columns(columns, schema.PROBE_SCORES)


def _is_valid(text: str, asked: _Asked) -> bool:
    """An answer the analysis keeps: a number's start, an option letter, or an option number (not "0", the
    reference prompt's "not sure")."""
    stripped = text.strip()
    if asked.kind == "choice":
        return bool(_CHOICE.fullmatch(stripped.upper().strip("()")))
    if asked.kind == "options":
        return stripped.isdigit() and 1 <= int(stripped) <= asked.options
    return bool(_NUMERIC_START.fullmatch(stripped))


def _same_answer_start(text: str, expected: str, kind: str) -> bool:
    """A leading space or bracket does not make a different answer: " 1" starts "18" as "1" does."""
    a, b = text.strip().strip("()"), expected.strip().strip("()")
    if kind == "choice":
        a, b = a.upper(), b.upper()
    return bool(a) and a == b


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (probability a correct example outscores a wrong one; ties count half).

    Mann-Whitney form with average ranks; None when one class is absent."""
    values = np.asarray(scores, dtype=float)
    positive = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    begin = 0
    while begin < len(values):  # average rank over ties
        end = begin
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[begin]:
            end += 1
        ranks[order[begin : end + 1]] = (begin + end) / 2 + 1
        begin = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _summarise(workspace: Workspace, report: ProbeReport) -> None:
    """Accuracy and the ROC AUC of 1 - H / max(H) against correctness over every row under the key (earlier
    runs included), valid answers only, overall and per category (the reference's per-category AUC)."""
    parts = workspace.parts("probe_scores")
    if not parts:
        return
    rows = pq.read_table([str(p) for p in parts], columns=["entropy", "is_valid", "is_correct", "category", "not_sure"],
                         filters=[("probe_key", "=", report.key)]).to_pylist()
    report.rows = len(rows)
    report.not_sure = sum(bool(r["not_sure"]) for r in rows)
    valid = [r for r in rows if r["is_valid"]]
    report.valid, report.correct = len(valid), sum(bool(r["is_correct"]) for r in valid)
    top = max((r["entropy"] for r in valid), default=0.0) or 1.0
    report.roc_auc = roc_auc([1 - r["entropy"] / top for r in valid], [bool(r["is_correct"]) for r in valid])
    for category in sorted({r["category"] for r in valid if r["category"]}):
        members = [r for r in valid if r["category"] == category]
        report.auc_by_category[category] = roc_auc([1 - r["entropy"] / top for r in members], [bool(r["is_correct"]) for r in members])
