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

import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from curate import schema
from curate.distributed import RaySettings, check_replica_key, merge_counts, on_worker, shard_outputs
from curate.engines import DEFAULT_DTYPE, Engine, ModelIdentity, identify, open_engine, torch_dtype
from curate.head import CANDIDATES, OutputHead, load_head, pair_signals, token_signals
from curate.kernel.chat_tokens import PROMPT_FORMATS, ChatTokens, TemplateError, template_hash, tokenize, tokenize_chat
from curate.kernel.keys import run_key
from curate.kernel.machine import device as machine_device
from curate.kernel.runs import recorded_run
from curate.kernel.vllm_factory import EngineOptions
from curate.score_tables import list_column, rebuild_sample_scores, scored_column, table_from_columns, top_column
from curate.stream import TokenProgress, done_ids, example_predicate, pending_examples
from curate.workspace import Workspace

OVERLONG = ("skip", "truncate")
CHAT, RESPONSE_ONLY = "chat", "response_only"
# tokens per engine call inside a shard: the progress bar moves at least this often
BATCH_TOKENS = {"cpu": 8192, "cuda": 65536}


@dataclass(frozen=True)
class ScoreSpec:
    """Everything that decides the rows of one scoring run; its hash is the score key."""

    model: dict[str, str]  # ModelIdentity.spec(): fingerprint and precision
    engine: str
    top_k: int
    max_len: int
    overlong: str
    head_candidates: int  # logits recomputed in fp32 per position by a low-precision head (curate.head)
    engine_options: dict[str, Any]  # EngineOptions.identity(): those that can change results
    template: str  # chat template hash (also inside the fingerprint; kept readable)
    prompt_format: str  # chat (the model's chat template) or alpaca (InstructDiff's plain-text format)
    signals: str = "exact"  # exact (full-vocabulary entropy, our head) or logprob-only (a server's prompt log-probs)


@dataclass
class Scorer:
    """An open engine with its head and tokenizer: the expensive part, reusable across calls."""

    engine: Engine
    head: OutputHead
    tokenizer: Any
    identity: ModelIdentity
    top_k: int
    overlong: str = "skip"
    options: EngineOptions = field(default_factory=EngineOptions)
    prompt_format: str = "chat"

    @property
    def model(self) -> str:
        return self.identity.given

    @property
    def spec(self) -> ScoreSpec:
        return ScoreSpec(self.identity.spec(), self.engine.name, self.top_k, self.engine.max_len, self.overlong,
                         CANDIDATES if self.head.is_low_precision else 0, self.options.identity(),
                         template_hash(self.tokenizer), self.prompt_format)

    @property
    def key(self) -> str:
        return run_key(self.spec)

    served = False

    def close(self) -> None:
        self.engine.close()

    def card(self) -> ScorerCard:
        engine = EngineCard(self.engine.max_len, self.engine.name, self.engine.version, self.engine.dtype)
        return ScorerCard(self.identity, self.spec, self.key, engine, self.prompt_format, self.options)


@dataclass
class EngineCard:
    """What a scoring run records of an engine this process does not hold (a server, or Ray replicas)."""

    max_len: int
    name: str = "vllm-server"
    version: str = "openai-compatible"
    dtype: str = "server"


@dataclass(frozen=True)
class ScorerCard:
    """A scorer as the driver of a Ray run knows it: what the replicas opened (their key), without an engine."""

    identity: ModelIdentity
    spec: ScoreSpec
    key: str
    engine: EngineCard
    prompt_format: str
    options: EngineOptions
    served = False

    @property
    def model(self) -> str:
        return self.identity.given


SERVED_SIGNALS = ("auto", "exact", "logprobs")


@dataclass
class ServedScorer:
    """Scoring through a served vLLM, sent as token ids (the server does not tokenize again), one of two ways:

    * exact (a server started with the pooling runner, ``curate.served.POOLING_ARGS``): the server returns each token's
      final hidden state (``/pooling``, task token_embed, float32) and our head, loaded from the model's local
      copy, computes log-prob, full-vocabulary entropy and top-k exactly as an in-process run does;
    * log-prob only (any generating vLLM server): its prompt log-probs give the exact log-prob of every token
      and its top-k; full-vocabulary entropy cannot come from a top-k, so these runs have none
      (``signals = logprob-only``) and recipes that need entropy or KL refuse them.
    """

    endpoint: Any  # curate.served.Endpoint
    identity: Any  # curate.generate.ServedIdentity
    tokenizer: Any
    top_k: int
    engine: EngineCard
    overlong: str = "skip"
    prompt_format: str = "chat"
    options: EngineOptions = field(default_factory=EngineOptions)
    client: Any = None
    head: OutputHead | None = None  # exact: our head (fp32) on the server's hidden states
    head_fingerprint: str | None = None  # the local copy the head came from
    served = True

    @property
    def model(self) -> str:
        return self.identity.given

    @property
    def spec(self) -> ScoreSpec:
        model = self.identity.spec() | ({"head": self.head_fingerprint} if self.head is not None else {})
        return ScoreSpec(model, self.engine.name, self.top_k, self.engine.max_len, self.overlong, 0, {},
                         template_hash(self.tokenizer), self.prompt_format, "exact" if self.head is not None else "logprob-only")

    @property
    def key(self) -> str:
        return run_key(self.spec)

    def close(self) -> None:
        pass

    def signals(self, sequences: list[list[int]]) -> list[Any]:
        """Per sequence its TokenSignals, or None where the request failed (the next run sends it again)."""
        return self._exact(sequences) if self.head is not None else self._logprobs(sequences)

    def _exact(self, sequences: list[list[int]]) -> list[Any]:
        import torch

        from curate.served import Client, run_requests

        hidden: list[Any] = [None] * len(sequences)

        def done(index: int, outcome: Any) -> None:
            if outcome.body is not None:
                hidden[index] = decode_hidden_states(outcome.body, len(sequences[index]))

        self.client = self.client or Client(self.endpoint)
        run_requests(self.endpoint, "/pooling", [pooling_payload(self.endpoint.served_model, s) for s in sequences], done,
                     client=self.client)
        assert self.head is not None
        device = self.head.weight.device
        return [token_signals(h.to(device), torch.tensor(s), self.head, top_k=self.top_k) if h is not None else None
                for h, s in zip(hidden, sequences)]

    def _logprobs(self, sequences: list[list[int]]) -> list[Any]:
        import torch

        from curate.head import TokenSignals
        from curate.served import Client, run_requests

        found: list[Any] = [None] * len(sequences)

        def done(index: int, outcome: Any) -> None:
            if outcome.body is None:
                return
            positions = outcome.body["choices"][0]["prompt_logprobs"][1:]
            ids = sequences[index][1:]
            chosen, top_ids, top_values = [], [], []
            for token, entries in zip(ids, positions):
                chosen.append(entries[str(token)]["logprob"])
                ranked = sorted((v["rank"], int(k), v["logprob"]) for k, v in entries.items() if v["rank"] <= self.top_k)
                top_ids.append([i for _, i, _ in ranked])
                top_values.append([v for _, _, v in ranked])
            found[index] = TokenSignals(torch.tensor(chosen, dtype=torch.float32), None,
                                        torch.tensor(top_ids, dtype=torch.long).reshape(len(ids), self.top_k),
                                        torch.tensor(top_values, dtype=torch.float32).reshape(len(ids), self.top_k))

        self.client = self.client or Client(self.endpoint)
        payloads = [{"model": self.endpoint.served_model, "prompt": list(s), "max_tokens": 1, "temperature": 0,
                     "prompt_logprobs": self.top_k} for s in sequences]
        run_requests(self.endpoint, "/completions", payloads, done, client=self.client)
        return found


def pooling_payload(served_model: str, token_ids: list[int]) -> dict[str, Any]:
    """vLLM's /pooling request for every token's final hidden state, as little-endian float32 in base64."""
    return {"model": served_model, "input": list(token_ids), "task": "token_embed", "encoding_format": "base64",
            "embed_dtype": "float32", "endianness": "little"}


def decode_hidden_states(body: dict[str, Any], n_tokens: int) -> Any:
    import base64

    import torch

    values = np.frombuffer(base64.b64decode(body["data"][0]["data"]), dtype="<f4")
    return torch.from_numpy(values.copy()).reshape(n_tokens, -1)


def serves_hidden_states(endpoint: Any) -> bool:
    """Whether the server runs the pooling runner with token_embed (one tiny /pooling request)."""
    import httpx

    try:
        response = httpx.post(endpoint.address("/pooling"), json=pooling_payload(endpoint.served_model, [0, 0]),
                              headers=endpoint.headers(), timeout=min(endpoint.timeout, 60))
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def open_served_scorer(endpoint: Any, *, local_model: str | None = None, signals: str = "auto", top_k: int = 5,
                       max_len: int | None = None, overlong: str = "skip", prompt_format: str = "chat") -> ServedScorer:
    """A scorer behind ``endpoint`` (vLLM's server), exact where the server runs the pooling runner (``signals``
    auto or exact), else log-prob only (``signals`` auto or logprobs). ``local_model``: the served model's local
    copy (its tokenizer and chat template make the token spans; an exact run loads its output head); default:
    the model root the server reports, when that folder is on this machine."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from curate.generate import ServedIdentity
    from curate.kernel.fingerprint import model_fingerprint
    from curate.models import resolve
    from curate.served import POOLING_ARGS, describe

    if signals not in SERVED_SIGNALS:
        raise ValueError(f"--served-signals {signals!r}: choose one of {', '.join(SERVED_SIGNALS)}")
    info = describe(endpoint)
    source = local_model or (info["root"] if info.get("root") and Path(info["root"]).is_dir() else None)
    if source is None:
        raise ValueError(f"the server names no model root on this machine ({info.get('root')}): pass --local-model M, a local "
                         "copy of the served model (its tokenizer; for exact signals its output head too)")
    model_dir = resolve(source)
    limit = max_len or int(info.get("max_model_len") or 2048)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    exact = signals != "logprobs" and serves_hidden_states(endpoint)
    if signals == "exact" and not exact:
        raise ValueError(f"{endpoint.base} does not return hidden states (/pooling, task token_embed): start the server with "
                         f"{shlex.join(POOLING_ARGS)}, or use --served-signals logprobs (log-prob and top-k only)")
    if exact:
        import torch

        head = load_head(model_dir, dtype=torch.float32).to(machine_device())
        return ServedScorer(endpoint, ServedIdentity(info), tokenizer, top_k, EngineCard(limit, "vllm-server-pooling"), overlong,
                            prompt_format, head=head, head_fingerprint=model_fingerprint(model_dir))
    if not 0 <= top_k <= 20:
        raise ValueError(f"--top-k {top_k}: vLLM's server returns at most 20 prompt log-probs per token by default")
    return ServedScorer(endpoint, ServedIdentity(info), tokenizer, top_k, EngineCard(limit), overlong, prompt_format)


def open_scorer(model: str, *, engine: str = "vllm", dtype: str = DEFAULT_DTYPE, top_k: int = 5, max_len: int | None = None,
                overlong: str = "skip", options: EngineOptions | None = None, together: int = 1, prompt_format: str = "chat") -> Scorer:
    from transformers import AutoTokenizer

    from curate.models import resolve

    if overlong not in OVERLONG:
        raise ValueError(f"unknown overlong policy {overlong!r}; choose one of {', '.join(OVERLONG)}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
    options = options or EngineOptions()
    model_dir = resolve(model)
    head = load_head(model_dir, dtype=torch_dtype(dtype))  # refuses unknown architectures before the engine starts
    opened = open_engine(engine, model_dir, dtype=dtype, max_len=max_len or options.max_model_len, options=options,
                         together=together)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Scorer(opened, head.to(machine_device()), tokenizer, identify(model, model_dir, opened.dtype), top_k, overlong, options,
                  prompt_format)


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
    are the ones a local run writes; this process holds no engine (one worker opens the model once first, to
    learn the run key the replicas will have)."""
    example_predicate(workspace, where)
    card = on_worker(settings.address, describe_scorer, settings.opener)
    return _run(workspace, [card], where=where, ifd=ifd, shard_size=shard_size, progress=progress, ray=settings)


def describe_scorer(options: dict[str, Any]) -> ScorerCard:
    """What ``open_scorer(**options)`` opens, as a card (run on a worker: the driver holds no engine)."""
    scorer = open_scorer(**options)
    try:
        return scorer.card()
    finally:
        scorer.close()


def score_pair(workspace: Workspace, base: Scorer, calibrated: Scorer, *, where: str | None = None, shard_size: int = 128,
               progress: bool = True) -> ScoreReport:
    """Both models' token scores plus per-token KL(calibrated ‖ base) and log-ratio, on the same tokens."""
    if base.served or calibrated.served:
        raise ValueError("--pair needs both models' full distributions (KL): score them in-process (--model / --pair without "
                         "--endpoint); a server's prompt log-probs give a top-k only")
    if base.head.vocab_size != calibrated.head.vocab_size or template_hash(base.tokenizer) != template_hash(calibrated.tokenizer):
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
    import time

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
    with workspace.writing(), recorded_run(workspace.root, "pair" if is_pair else "score", key, **_record(scorers, where, ifd)) as record:
        done = {(s.key, v): done_ids(workspace, "token_scores", "score_key", s.key, where=[("variant", "=", v)])
                for s in distinct for v in variants}
        pair_done = done_ids(workspace, "pair_scores", "pair_key", key) if is_pair else set()
        finished = set.intersection(*done.values(), *([pair_done] if is_pair else []))
        picked = pending_examples(workspace, predicate, set())
        pending = [(i, chars) for i, chars in picked if i not in finished]
        report.examples_already_done = len(picked) - len(pending)
        bar = TokenProgress("score", characters=sum(chars for _, chars in pending), enabled=progress)
        started = time.perf_counter()
        here = None if ray else ShardScorer(scorers, done, pair_done, ifd, key, bar)
        job = ScoreJob(ray.opener, done, ifd, key) if ray else None
        for outputs, counts in shard_outputs(workspace, predicate, shard_size, ("example_id", "messages"), skip=finished,
                                             work=here, job=job, ray=ray):
            for table, rows in outputs:
                workspace.write_part(table, rows, schema=schema.TABLES[table])
            merge_counts(report, counts)
            if ray is not None:  # a replica's tokens: the bar learns of them when its shard comes back
                bar.tokenized(counts["tokens_scored"], counts["characters"])
                bar.done(counts["tokens_scored"])
            bar.bar.set_postfix_str(f"{report.examples_scored:,}/{len(pending):,} examples")
        bar.close()
        report.seconds = time.perf_counter() - started
        if workspace.has_table("token_scores"):
            report.sample_rows = sum(rebuild_sample_scores(workspace, s.key) for s in distinct)
        record.counts = vars(report)
        workspace.write_manifest("score", {"key": key, **_record(scorers, where, ifd)["parameters"], "report": vars(report)})
    from curate.verify import check_tables

    check_tables(workspace, ["token_scores", "sample_scores"] + (["pair_scores"] if is_pair else []))
    return report


def _record(scorers: list[Scorer], where: str | None, ifd: bool) -> dict[str, Any]:
    """What the run registry keeps about a scoring run."""
    models = [{"key": s.key, "model": s.model, "path": s.identity.path, "spec": s.spec,
               "engine_version": s.engine.version} for s in scorers]
    parameters: dict[str, Any] = {"models": models, "where": where, "ifd": ifd}
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
    """Token rows (every model, every variant still to do) and pair rows for one shard, engine batch by batch."""
    import torch

    rows: dict[tuple[str, str], list[tuple[Prepared, Any]]] = {}
    pairs: list[tuple[Prepared, Any]] = []
    budget = BATCH_TOKENS[machine_device()]
    for batch in _token_batches(prepared, budget):
        states: dict[str, list[Any]] = {}
        for scorer in distinct:
            if scorer.served:
                _served_batch(scorer, batch, rows)
                continue
            wanted = [p for p in batch if (scorer.key, CHAT) in p.todo or p.needs_pair]
            hidden = dict(zip((p.example_id for p in wanted), scorer.engine.hidden_states([p.chat.token_ids for p in wanted])))
            states[scorer.key] = [hidden.get(p.example_id) for p in batch]
            for p in wanted:
                if (scorer.key, CHAT) in p.todo:
                    rows.setdefault((scorer.key, CHAT), []).append((p, _signals(scorer, hidden[p.example_id], p.chat)))
            alone = [p for p in batch if (scorer.key, RESPONSE_ONLY) in p.todo]
            for p, h in zip(alone, scorer.engine.hidden_states([p.response_only.token_ids for p in alone])):  # type: ignore[union-attr]
                rows.setdefault((scorer.key, RESPONSE_ONLY), []).append((p, _signals(scorer, h, p.response_only)))
        if len(scorers) == 2:
            base, calibrated = scorers
            device = base.head.weight.device
            for index, p in enumerate(batch):
                if p.needs_pair:
                    b, c = states[base.key][index], states[calibrated.key][index]
                    pairs.append((p, pair_signals(b.to(device), c.to(device), torch.tensor(p.chat.token_ids), base.head, calibrated.head)))
        if bar is not None:
            bar.done(sum(len(p.chat) for p in batch))
    by_key = {s.key: s for s in distinct}
    tables = [_token_table(by_key[k], items, variant) for (k, variant), items in rows.items()]
    token_rows = pa.concat_tables(tables) if tables else schema.TOKEN_SCORES.empty_table()
    pair_rows = _pair_table(scorers[0], scorers[1], key, pairs) if len(scorers) == 2 else None
    return token_rows, pair_rows


def _served_batch(scorer: ServedScorer, batch: list[Prepared], rows: dict) -> None:
    """One engine batch through the server: every variant still to do; a failed request leaves its example
    unscored (the next run sends it again)."""
    for variant in (CHAT, RESPONSE_ONLY):
        wanted = [p for p in batch if (scorer.key, variant) in p.todo]
        tokens = [p.chat if variant == CHAT else p.response_only for p in wanted]
        for p, signals in zip(wanted, scorer.signals([t.token_ids for t in tokens])):  # type: ignore[union-attr]
            if signals is not None:
                rows.setdefault((scorer.key, variant), []).append((p, signals))


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
    prepared = [p for p, _ in items]
    signals = [s for _, s in items]
    tokens = [p.chat if variant == CHAT else p.response_only for p in prepared]
    n = len(prepared)
    identity = scorer.identity
    columns = {
        "example_id": [p.example_id for p in prepared],
        "score_key": [scorer.key] * n,
        "variant": [variant] * n,
        "model": [scorer.model] * n,
        "model_hash": [identity.fingerprint] * n,
        "dtype": [identity.dtype] * n,
        "engine": [scorer.engine.name] * n,
        "engine_version": [scorer.engine.version] * n,
        "template_hash": [template_hash(scorer.tokenizer)] * n,
        "top_k": [scorer.top_k] * n,
        "n_tokens": [len(t) for t in tokens],  # type: ignore[arg-type]
        "truncated": [p.truncated for p in prepared],
        "token_ids": list_column([np.asarray(t.token_ids) for t in tokens], pa.int32()),  # type: ignore[union-attr]
        "message_index": list_column([np.asarray(t.message_index) for t in tokens], pa.int16()),  # type: ignore[union-attr]
        "role": pa.array([t.role for t in tokens], type=pa.list_(pa.string())),  # type: ignore[union-attr]
        "is_response": list_column([np.asarray(t.is_response, dtype=bool) for t in tokens], pa.bool_()),  # type: ignore[union-attr]
        "is_end_of_turn": list_column([np.asarray(t.is_end_of_turn, dtype=bool) for t in tokens], pa.bool_()),  # type: ignore[union-attr]
        "logprob": scored_column([s.logprob.numpy() for s in signals], pa.float32()),
        "entropy": scored_column([s.entropy.numpy() if s.entropy is not None else np.full(len(s.logprob), np.nan) for s in signals],
                                 pa.float32()),
        "signals": [scorer.spec.signals] * n,
        "top_ids": top_column([s.top_ids.numpy() for s in signals], pa.int32()),
        "top_logprobs": top_column([s.top_logprobs.numpy() for s in signals], pa.float32()),
    }
    return table_from_columns(columns, schema.TOKEN_SCORES)


def _pair_table(base: Scorer, calibrated: Scorer, key: str, items: list[tuple[Prepared, Any]]) -> pa.Table:
    prepared = [p for p, _ in items]
    signals = [s for _, s in items]
    n = len(prepared)
    columns = {
        "example_id": [p.example_id for p in prepared],
        "pair_key": [key] * n,
        "base_key": [base.key] * n,
        "calibrated_key": [calibrated.key] * n,
        "n_tokens": [len(p.chat) for p in prepared],
        "is_response": list_column([np.asarray(p.chat.is_response, dtype=bool) for p in prepared], pa.bool_()),
        "kl": scored_column([s.kl.numpy() for s in signals], pa.float32()),
        "log_ratio": scored_column([s.log_ratio.numpy() for s in signals], pa.float32()),
    }
    return table_from_columns(columns, schema.PAIR_SCORES)
