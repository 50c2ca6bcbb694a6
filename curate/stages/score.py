"""``curate score``: per-token log-prob, exact entropy and top-k (and KL for two models) into Parquet.

Work goes in shards of examples. Each shard's rows are written as one atomic Parquet part per table. Rows
carry the score key (the hash of a ``ScoreSpec``: model fingerprint, precision, engine, top-k, context limit,
overlong policy, head settings, signals version) and a variant (``chat``, or ``response_only`` for IFD);
what is done is tracked per (key, variant, example), so a killed run, re-run, produces exactly the rows an
uninterrupted run does, ``--ifd`` after a plain run adds only the response-only pass, and a re-run with the
same inputs does nothing. A different model or parameter gets a different key and lands beside the old rows.
``sample_scores`` is rebuilt from ``token_scores`` by SQL at the end of every run.

The model runs in this process (``open_scorer``: vLLM's pooling runner or transformers, and our head),
behind vLLM's server (``open_served_scorer``: exact through a pooling server, or prompt log-probs only), or
on Ray replicas (``score_on_ray``); a shard becomes rows through ``ShardScorer`` whichever it is.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from curate.kernel.chat_tokens import (
    ChatTokens,
    TemplateError,
    template_hash,
    tokenize,
    tokenize_chat,
)
from curate.kernel.keys import run_key
from curate.kernel.machine import device as machine_device
from curate.models.head import PairSignals, pair_signals, token_signals
from curate.models.scorer import Scorer, ServedScorer, open_scorer, scorer_card
from curate.stages.runner import Plan, StageRun, run_stage
from curate.stages.shards import (
    RaySettings,
    check_replica_key,
    replica_precision,
)
from curate.store import schema
from curate.store.examples import (
    TokenProgress,
    described,
    done_ids,
    example_predicate,
)
from curate.store.score_tables import pair_scores_table, rebuild_sample_scores, token_scores_table
from curate.store.workspace import Workspace

CHAT, RESPONSE_ONLY = "chat", "response_only"
# tokens per engine call inside a shard: the progress bar moves at least this often
BATCH_TOKENS = {"cpu": 8192, "cuda": 65536}


@dataclass
class ScoreReport:
    key: str
    examples_scored: int = 0
    examples_already_done: int = 0
    tokens_scored: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    seconds: float = 0.0
    sample_rows: int = 0

    def summary(self) -> str:
        rate = self.tokens_scored / self.seconds if self.seconds else 0.0
        lines = [
            f"score key            {self.key}",
            f"examples scored      {self.examples_scored:>8,}",
            f"already scored       {self.examples_already_done:>8,}",
            f"tokens scored        {self.tokens_scored:>8,}  ({rate:,.0f} tokens/s)",
            f"truncated            {self.truncated:>8,}",
            f"skipped              {sum(self.skipped.values()):>8,}",
        ]
        lines += [f"  {reason:<26}{count:>6,}" for reason, count in sorted(self.skipped.items())]
        return "\n".join(lines)


@dataclass
class Prepared:
    example_id: str
    chat: ChatTokens
    response_only: ChatTokens | None
    truncated: bool
    todo: set[tuple[str, str]]  # (score key, variant) rows still to write
    needs_pair: bool


def score(workspace: Workspace, scorer: Scorer, *, where: str | None = None, ifd: bool = False, shard_size: int = 128,
          progress: bool = True) -> ScoreReport:
    """Score every example (or those the SQL filter ``where`` picks) under one model."""
    return _run(workspace, [scorer], where=where, ifd=ifd, shard_size=shard_size, progress=progress)


def score_on_ray(workspace: Workspace, settings: RaySettings, *, where: str | None = None, ifd: bool = False,
                 shard_size: int = 128, progress: bool = True) -> ScoreReport:
    """``score`` on a Ray cluster: ``settings.replicas`` engines (one GPU each where the cluster has GPUs), each
    opened on its worker from ``settings.scorer`` (open_scorer's keywords). The rows, their key and the parts
    are the ones a local run writes; this process holds no engine: the run key comes from the model's files
    and the settings (``scorer_card``), and each replica checks it against the scorer it opens."""
    example_predicate(workspace, where)
    card = scorer_card(**settings.opener, precision=replica_precision(settings))  # no engine opened here
    return _run(workspace, [card], where=where, ifd=ifd, shard_size=shard_size, progress=progress, ray=settings)


def score_pair(workspace: Workspace, base: Scorer, calibrated: Scorer, *, where: str | None = None, shard_size: int = 128,
               progress: bool = True) -> ScoreReport:
    """Both models' token scores plus per-token KL(calibrated ‖ base) and log-ratio, on the same tokens."""
    if (base.head is None) != (calibrated.head is None):
        raise ValueError("a pair is scored from two models' hidden states (in-process, or pooling servers: KL and log-ratio) or "
                         "from two servers' prompt log-probs (the log-ratio only): give both models the same way")
    vocabularies_differ = base.head is not None and base.head.vocab_size != calibrated.head.vocab_size
    if vocabularies_differ or template_hash(base.tokenizer) != template_hash(calibrated.tokenizer):
        raise ValueError("the two models must share a tokenizer and chat template (vocab sizes or templates differ)")
    if base.prompt_format != calibrated.prompt_format:
        raise ValueError("the two models must be scored in the same prompt format")
    return _run(workspace, [base, calibrated], where=where, ifd=False, shard_size=shard_size, progress=progress)


def pair_key(base: Scorer, calibrated: Scorer) -> str:
    return run_key({"base": base.key, "calibrated": calibrated.key})


@dataclass
class ShardScorer:
    """Turns a shard of example rows into token (and pair) rows: the same function for the local loop and for
    every Ray replica. ``done`` holds, per (score key, variant), the examples that already have rows."""

    scorers: list[Any]
    done: dict[tuple[str, str], set[str]]
    pair_done: set[str]
    ifd: bool
    key: str
    bar: Any = None  # a TokenProgress locally; None on a replica

    def __call__(self, shard: list[dict[str, Any]]) -> tuple[list[tuple[str, pa.Table]], dict[str, Any]]:
        distinct = list({s.key: s for s in self.scorers}.values())  # `--pair M M`: one model's rows, written once
        variants = [CHAT, RESPONSE_ONLY] if self.ifd else [CHAT]
        is_pair = len(self.scorers) == 2
        report = ScoreReport(self.key)
        prepared, characters = [], 0
        for row in shard:
            todo = {(s.key, v) for s in distinct for v in variants if row["example_id"] not in self.done[(s.key, v)]}
            needs_pair = is_pair and row["example_id"] not in self.pair_done
            characters += sum(len(m["content"]) for m in row["messages"])
            item = _prepare(self.scorers[0], row, self.ifd, todo, needs_pair, report)
            if item is not None:
                prepared.append(item)
        report.tokens_scored = sum(len(p.chat) for p in prepared)
        report.examples_scored = len(prepared)
        if self.bar is not None:
            self.bar.tokenized(report.tokens_scored, characters)
        outputs: list[tuple[str, pa.Table]] = []
        if prepared:
            token_rows, pair_rows = _score_shard(distinct, self.scorers, prepared, self.key, self.bar)
            outputs.append(("token_scores", token_rows))
            if is_pair:
                outputs.append(("pair_scores", pair_rows))
        counts = {k: v for k, v in vars(report).items() if k not in ("key", "seconds", "sample_rows", "examples_already_done")}
        return outputs, counts | {"characters": characters}


@dataclass(frozen=True)
class ScoreJob:
    """What a Ray replica needs to score (picklable): it opens its own engine and checks the run key."""

    opener: dict[str, Any]
    done: dict[tuple[str, str], set[str]]
    ifd: bool
    key: str

    def open(self) -> ShardScorer:
        scorer = open_scorer(**self.opener)
        check_replica_key(scorer.key, self.key)
        return ShardScorer([scorer], self.done, set(), self.ifd, self.key)


def _run(workspace: Workspace, scorers: list[Any], *, where: str | None, ifd: bool, shard_size: int, progress: bool,
         ray: RaySettings | None = None) -> ScoreReport:
    predicate = example_predicate(workspace, where)
    is_pair = len(scorers) == 2
    key = pair_key(*scorers) if is_pair else scorers[0].key
    distinct = list({s.key: s for s in scorers}.values())
    if ifd and scorers[0].prompt_format != "chat":
        raise ValueError("--ifd scores the reply alone in the chat template: use it with --prompt-format chat")
    if ray is not None and (is_pair or any(s.served for s in scorers)):
        raise ValueError("--ray runs one in-process model per replica: score a pair, or a served model, without --ray")
    variants = [CHAT, RESPONSE_ONLY] if ifd else [CHAT]
    report = ScoreReport(key)
    recorded = _record(scorers, where, ifd)
    tables = ("token_scores", "sample_scores") + (("pair_scores",) if is_pair else ())
    run = StageRun("pair" if is_pair else "score", key, recorded["models"], recorded["parameters"], recorded["fingerprints"],
                   tables, ("example_id", "messages"), shard_size)

    def plan(con: Any, picked: list[tuple[str, int]]) -> Plan:
        done = {(s.key, v): done_ids(workspace, "token_scores", "score_key", s.key, where=[("variant", "=", v)])
                for s in distinct for v in variants}
        pair_done = done_ids(workspace, "pair_scores", "pair_key", key) if is_pair else set()
        finished = set.intersection(*done.values(), *([pair_done] if is_pair else []))
        pending = [(i, chars) for i, chars in picked if i not in finished]
        report.examples_already_done = len(picked) - len(pending)
        bar = ScoreProgress(TokenProgress("score", characters=sum(chars for _, chars in pending), enabled=progress),
                            len(pending), on_replicas=ray is not None)
        if ray is not None:
            return Plan(finished, bar, job=ScoreJob(ray.opener, done, ifd, key))
        return Plan(finished, bar, work=ShardScorer(scorers, done, pair_done, ifd, key, bar.bar))

    def finish(con: Any) -> None:
        if workspace.has_table("token_scores"):
            report.sample_rows = sum(rebuild_sample_scores(workspace, s.key, connection=con) for s in distinct)

    return run_stage(workspace, run, report, predicate=predicate, plan=plan, ray=ray, finish=finish)


@dataclass
class ScoreProgress:
    """Scoring's bar counts tokens as each engine batch finishes (locally); a replica's tokens are counted
    when its shard comes back."""

    bar: TokenProgress
    pending: int
    on_replicas: bool

    def shard(self, counts: dict[str, Any], report: ScoreReport) -> None:
        if self.on_replicas:
            self.bar.tokenized(counts["tokens_scored"], counts["characters"])
            self.bar.done(counts["tokens_scored"])
        self.bar.bar.set_postfix_str(f"{report.examples_scored:,}/{self.pending:,} examples")

    def close(self) -> None:
        self.bar.close()


def _record(scorers: list[Scorer], where: str | None, ifd: bool) -> dict[str, Any]:
    """What the run registry keeps about a scoring run."""
    models = [{"key": s.key, "model": s.model, "path": s.identity.path, "spec": s.spec,
               "engine_version": s.engine.version} for s in scorers]
    parameters: dict[str, Any] = {"models": models, "where": described(where), "ifd": ifd}
    if len(scorers) == 2:
        parameters |= {"base": models[0], "calibrated": models[1]}
    return {"models": [name for s in scorers for name in s.identity.names()], "parameters": parameters,
            "fingerprints": {s.model: s.identity.fingerprint for s in scorers}}


def _prepare(scorer: Scorer, row: dict[str, Any], ifd: bool, todo: set[tuple[str, str]], needs_pair: bool,
             report: ScoreReport) -> Prepared | None:
    messages = row["messages"]
    try:
        chat = tokenize(scorer.tokenizer, messages, scorer.prompt_format)
    except TemplateError:
        report.skipped["template_error"] += 1
        return None
    limit = scorer.engine.max_len
    truncated = len(chat) > limit
    if truncated:
        if scorer.overlong == "skip":
            report.skipped["longer_than_context"] += 1
            return None
        chat = chat.truncated(limit)
        report.truncated += 1
    response_only = None
    if ifd and any(variant == RESPONSE_ONLY for _, variant in todo):
        response_only = _response_only(scorer, chat, messages, truncated, report)
        if response_only is None:
            todo = {(k, v) for k, v in todo if v != RESPONSE_ONLY}
    return Prepared(row["example_id"], chat, response_only, truncated, todo, needs_pair)


def _response_only(scorer: Scorer, chat: ChatTokens, messages: list[dict[str, str]], truncated: bool,
                   report: ScoreReport) -> ChatTokens | None:
    """The last reply scored without the conversation before it (IFD's denominator), or None (counted) when
    it cannot be compared token for token with the reply inside the conversation."""
    if truncated:
        report.skipped["ifd_not_for_truncated"] += 1
        return None
    try:
        alone = tokenize_chat(scorer.tokenizer, messages[-1:])
    except TemplateError:
        report.skipped["ifd_template_error"] += 1  # the template needs a user turn
        return None
    last = len(messages) - 1
    in_chat = sum(r and m == last for r, m in zip(chat.is_response, chat.message_index))
    if sum(alone.is_response) != in_chat:  # both passes must score the same reply tokens
        report.skipped["ifd_span_mismatch"] += 1
        return None
    return alone


def _score_shard(distinct: list[Scorer], scorers: list[Scorer], prepared: list[Prepared], key: str,
                 bar: TokenProgress | None) -> tuple[pa.Table, pa.Table | None]:
    """Token rows (every model, every variant still to do) and pair rows for one shard, engine batch by batch.
    An example whose served request failed gets no row (the next run sends it again)."""
    rows: dict[tuple[str, str], list[tuple[Prepared, Any]]] = {}
    pairs: list[tuple[Prepared, Any]] = []
    budget = BATCH_TOKENS[machine_device()]
    for batch in _token_batches(prepared, budget):
        states: dict[str, dict[str, Any]] = {}  # per model: example -> final hidden states
        logprobs: dict[str, dict[str, Any]] = {}  # per logprob-only server: example -> its signals
        for scorer in distinct:
            if scorer.head is None:  # a server's prompt log-probs: no hidden states, no entropy
                logprobs[scorer.key] = _served_batch(scorer, batch, rows)
                continue
            wanted = [p for p in batch if (scorer.key, CHAT) in p.todo or p.needs_pair]
            hidden = dict(zip((p.example_id for p in wanted), scorer.engine.hidden_states([p.chat.token_ids for p in wanted])))
            states[scorer.key] = {i: h for i, h in hidden.items() if h is not None}
            for p in wanted:
                if (scorer.key, CHAT) in p.todo and hidden[p.example_id] is not None:
                    rows.setdefault((scorer.key, CHAT), []).append((p, _signals(scorer, hidden[p.example_id], p.chat)))
            alone = [p for p in batch if (scorer.key, RESPONSE_ONLY) in p.todo]
            for p, h in zip(alone, scorer.engine.hidden_states([p.response_only.token_ids for p in alone])):  # type: ignore[union-attr]
                if h is not None:
                    rows.setdefault((scorer.key, RESPONSE_ONLY), []).append((p, _signals(scorer, h, p.response_only)))
        if len(scorers) == 2:
            pairs += _pair_batch(scorers, batch, states, logprobs)
        if bar is not None:
            bar.done(sum(len(p.chat) for p in batch))
    by_key = {s.key: s for s in distinct}
    tables = [_token_table(by_key[k], items, variant) for (k, variant), items in rows.items()]
    token_rows = pa.concat_tables(tables) if tables else schema.TOKEN_SCORES.empty_table()
    pair_rows = _pair_table(scorers[0], scorers[1], key, pairs) if len(scorers) == 2 else None
    return token_rows, pair_rows


def _pair_batch(scorers: list[Scorer], batch: list[Prepared], states: dict[str, dict[str, Any]],
                logprobs: dict[str, dict[str, Any]]) -> list[tuple[Prepared, PairSignals]]:
    """Pair signals for the batch's examples that need them and have both models' results: exact KL and
    log-ratio from two models' hidden states (in this process or from pooling servers), or the log-ratio
    alone from two servers' prompt log-probs (KL then stays null: recipes that need KL refuse the run)."""
    import torch

    base, calibrated = scorers
    found = []
    for p in batch:
        if not p.needs_pair:
            continue
        if base.key in logprobs:
            b, c = logprobs[base.key].get(p.example_id), logprobs[calibrated.key].get(p.example_id)
            if b is not None and c is not None:
                found.append((p, PairSignals(torch.full_like(b.logprob, float("nan")), c.logprob - b.logprob)))
            continue
        b, c = states[base.key].get(p.example_id), states[calibrated.key].get(p.example_id)
        if b is not None and c is not None:
            device = base.head.weight.device
            found.append((p, pair_signals(b.to(device), c.to(device), torch.tensor(p.chat.token_ids), base.head, calibrated.head)))
    return found


def _served_batch(scorer: ServedScorer, batch: list[Prepared], rows: dict) -> dict[str, Any]:
    """One engine batch through a log-prob server: every variant still to do (and the chat tokens a pair still
    needs); returns the chat signals by example."""
    chat: dict[str, Any] = {}
    for variant in (CHAT, RESPONSE_ONLY):
        wanted = [p for p in batch if (scorer.key, variant) in p.todo or variant == CHAT and p.needs_pair]
        tokens = [p.chat if variant == CHAT else p.response_only for p in wanted]
        for p, signals in zip(wanted, scorer.signals([t.token_ids for t in tokens])):  # type: ignore[union-attr]
            if signals is None:
                continue
            if variant == CHAT:
                chat[p.example_id] = signals
            if (scorer.key, variant) in p.todo:
                rows.setdefault((scorer.key, variant), []).append((p, signals))
    return chat


def _token_batches(prepared: list[Prepared], budget: int) -> list[list[Prepared]]:
    batches: list[list[Prepared]] = [[]]
    size = 0
    for item in prepared:
        if batches[-1] and size + len(item.chat) > budget:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += len(item.chat)
    return batches


def _signals(scorer: Scorer, hidden: Any, tokens: ChatTokens) -> Any:
    import torch

    return token_signals(hidden.to(scorer.head.weight.device), torch.tensor(tokens.token_ids), scorer.head, top_k=scorer.top_k)


def _token_table(scorer: Scorer, items: list[tuple[Prepared, Any]], variant: str) -> pa.Table:
    identity = scorer.identity
    run = {"score_key": scorer.key, "variant": variant, "model": scorer.model, "model_hash": identity.fingerprint,
           "dtype": identity.dtype, "engine": scorer.engine.name, "engine_version": scorer.engine.version,
           "template_hash": template_hash(scorer.tokenizer), "top_k": scorer.top_k, "signals": scorer.spec.signals}
    prepared = [p for p, _ in items]
    return token_scores_table(run, [p.example_id for p in prepared], [p.chat if variant == CHAT else p.response_only for p in prepared],
                              [p.truncated for p in prepared], [s for _, s in items])


def _pair_table(base: Scorer, calibrated: Scorer, key: str, items: list[tuple[Prepared, Any]]) -> pa.Table:
    keys = {"pair_key": key, "base_key": base.key, "calibrated_key": calibrated.key}
    return pair_scores_table(keys, [p.example_id for p, _ in items], [p.chat for p, _ in items], [s for _, s in items])
