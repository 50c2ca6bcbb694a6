"""``curate score``: per-token log-prob, exact entropy and top-k (and KL for two models) into Parquet.

Work goes in shards of examples. Each shard's rows are written as one atomic Parquet part per table, and a
shard is skipped when its rows already exist for the same key (model fingerprint + engine + parameters),
so a killed run, re-run, produces exactly the rows an uninterrupted run does, and a re-run with the same
inputs does nothing. A different model or parameter gets a different key and lands beside the old rows.
``sample_scores`` is rebuilt from ``token_scores`` by SQL at the end of every run.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from curate import schema
from train.chat_tokens import ChatTokens, TemplateError, template_hash, tokenize_chat
from curate.engines import DEFAULT_DTYPE, Engine, ModelFingerprint, fingerprint, open_engine, torch_dtype
from curate.head import OutputHead, load_head, pair_signals, token_signals
from curate.score_tables import list_column, rebuild_sample_scores, scored_column, table_from_columns, top_column
from curate.stream import count_pending, done_ids, example_shards, run_key
from curate.workspace import Workspace
from train.devices import device as machine_device

OVERLONG = ("skip", "truncate")


@dataclass
class Scorer:
    """An open engine with its head and tokenizer: the expensive part, reusable across calls."""

    engine: Engine
    head: OutputHead
    tokenizer: Any
    model: str
    fingerprint: ModelFingerprint
    top_k: int

    @property
    def key(self) -> str:
        parts = {**self.fingerprint.as_dict(), "engine": self.engine.name, "top_k": self.top_k,
                 "template": template_hash(self.tokenizer), "max_len": self.engine.max_len}
        return run_key(parts)


def open_scorer(model: str, *, engine: str = "vllm", dtype: str = DEFAULT_DTYPE, top_k: int = 5, max_len: int | None = None) -> Scorer:
    from transformers import AutoTokenizer

    from curate.models import resolve

    model_dir = resolve(model)
    head = load_head(model_dir, dtype=torch_dtype(dtype))  # refuses unknown architectures before the engine starts
    opened = open_engine(engine, model_dir, dtype=dtype, max_len=max_len)
    device = machine_device()  # where both engines put their hidden states
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Scorer(opened, head.to(device), tokenizer, model, fingerprint(model_dir, dtype), top_k)


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


def score(
    workspace: Workspace,
    scorer: Scorer,
    *,
    where: str | None = None,
    ifd: bool = False,
    overlong: str = "skip",
    shard_size: int = 128,
    progress: bool = True,
) -> ScoreReport:
    """Score every example (or those matching the SQL predicate ``where``) under one model."""
    return _run(workspace, [scorer], where=where, ifd=ifd, overlong=overlong, shard_size=shard_size, progress=progress)


def score_pair(
    workspace: Workspace,
    base: Scorer,
    calibrated: Scorer,
    *,
    where: str | None = None,
    overlong: str = "skip",
    shard_size: int = 128,
    progress: bool = True,
) -> ScoreReport:
    """Both models' token scores plus per-token KL(calibrated ‖ base) and log-ratio, on the same tokens."""
    if base.head.vocab_size != calibrated.head.vocab_size or template_hash(base.tokenizer) != template_hash(calibrated.tokenizer):
        raise ValueError("the two models must share a tokenizer and chat template (vocab sizes or templates differ)")
    return _run(workspace, [base, calibrated], where=where, ifd=False, overlong=overlong, shard_size=shard_size, progress=progress)


def pair_key(base: Scorer, calibrated: Scorer) -> str:
    return run_key({"base": base.key, "calibrated": calibrated.key})


def _run(
    workspace: Workspace, scorers: list[Scorer], *, where: str | None, ifd: bool, overlong: str, shard_size: int, progress: bool
) -> ScoreReport:
    if overlong not in OVERLONG:
        raise ValueError(f"unknown overlong policy {overlong!r}; choose one of {', '.join(OVERLONG)}")
    is_pair = len(scorers) == 2
    key = pair_key(*scorers) if is_pair else scorers[0].key
    report = ScoreReport(key)
    done = done_ids(workspace, "pair_scores", "pair_key", key) if is_pair else done_ids(workspace, "token_scores", "score_key", key)
    done_per_model = [done_ids(workspace, "token_scores", "score_key", s.key) for s in scorers]
    started = time.perf_counter()
    bar = tqdm(total=count_pending(workspace, where, done), desc="score", unit=" ex", disable=not progress, file=sys.stderr)
    for shard in example_shards(workspace, where, shard_size):
        pending = [row for row in shard if row["example_id"] not in done]
        report.examples_already_done += len(shard) - len(pending)
        prepared = [p for p in (_prepare(scorers[0], row, ifd, overlong, report) for row in pending) if p is not None]
        if not prepared:
            continue
        chats = [p.chat.token_ids for p in prepared]
        hidden = [s.engine.hidden_states(chats) for s in scorers]
        for index, scorer in enumerate(scorers):
            todo = [i for i, p in enumerate(prepared) if p.example_id not in done_per_model[index]]
            rows = _token_table(scorer, [prepared[i] for i in todo], [hidden[index][i] for i in todo], "chat")
            if ifd and not is_pair:
                with_response = [p for p in prepared if p.response_only is not None]
                states = scorer.engine.hidden_states([p.response_only.token_ids for p in with_response])  # type: ignore[union-attr]
                rows = pa.concat_tables([rows, _token_table(scorer, with_response, states, "response_only")])
            workspace.write_part("token_scores", rows, schema=schema.TOKEN_SCORES)
            done_per_model[index].update(prepared[i].example_id for i in todo)
        if is_pair:
            workspace.write_part("pair_scores", _pair_table(scorers[0], scorers[1], key, prepared, hidden), schema=schema.PAIR_SCORES)
        report.examples_scored += len(prepared)
        report.tokens_scored += sum(len(c) for c in chats)
        bar.update(len(pending))
        bar.set_postfix_str(f"{report.tokens_scored / (time.perf_counter() - started):,.0f} tok/s")
    bar.close()
    report.seconds = time.perf_counter() - started
    if workspace.has_table("token_scores"):
        report.sample_rows = sum(rebuild_sample_scores(workspace, scorer.key) for scorer in scorers)
    workspace.write_manifest(
        "score",
        {
            "key": key,
            "models": [{"model": s.model, "key": s.key, **s.fingerprint.as_dict(), "engine": s.engine.name,
                        "engine_version": s.engine.version, "top_k": s.top_k, "max_len": s.engine.max_len} for s in scorers],
            "where": where, "ifd": ifd, "overlong": overlong,
            "report": vars(report),
        },
    )
    return report


def _prepare(scorer: Scorer, row: dict[str, Any], ifd: bool, overlong: str, report: ScoreReport) -> Prepared | None:
    messages = row["messages"]
    try:
        chat = tokenize_chat(scorer.tokenizer, messages)
    except TemplateError:
        report.skipped["template_error"] += 1
        return None
    limit = scorer.engine.max_len
    truncated = len(chat) > limit
    if truncated:
        if overlong == "skip":
            report.skipped["longer_than_context"] += 1
            return None
        chat = chat.truncated(limit)
        report.truncated += 1
    response_only = None
    if ifd:
        try:
            response_only = tokenize_chat(scorer.tokenizer, messages[-1:])
        except TemplateError:
            response_only = None  # the template needs a user turn: IFD stays null for this example
        if response_only is not None and len(response_only) > limit:
            response_only = response_only.truncated(limit)
    return Prepared(row["example_id"], chat, response_only, truncated)


def _token_table(scorer: Scorer, prepared: list[Prepared], hidden: list[Any], variant: str) -> pa.Table:
    import torch

    tokens = [p.chat if variant == "chat" else p.response_only for p in prepared]
    signals = [
        token_signals(h.to(scorer.head.weight.device), torch.tensor(t.token_ids), scorer.head, top_k=scorer.top_k)  # type: ignore[union-attr]
        for h, t in zip(hidden, tokens)
    ]
    n = len(prepared)
    fp = scorer.fingerprint
    columns = {
        "example_id": [p.example_id for p in prepared],
        "score_key": [scorer.key] * n,
        "variant": [variant] * n,
        "model": [scorer.model] * n,
        "model_hash": [fp.weights_hash] * n,
        "dtype": [fp.dtype] * n,
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
        "logprob": scored_column([s.logprob.numpy() for s in signals], pa.float32()),
        "entropy": scored_column([s.entropy.numpy() for s in signals], pa.float32()),
        "top_ids": top_column([s.top_ids.numpy() for s in signals], pa.int32()),
        "top_logprobs": top_column([s.top_logprobs.numpy() for s in signals], pa.float32()),
    }
    return table_from_columns(columns, schema.TOKEN_SCORES)


def _pair_table(base: Scorer, calibrated: Scorer, key: str, prepared: list[Prepared], hidden: list[list[Any]]) -> pa.Table:
    import torch

    device = base.head.weight.device
    signals = [
        pair_signals(b.to(device), c.to(device), torch.tensor(p.chat.token_ids), base.head, calibrated.head)
        for p, b, c in zip(prepared, hidden[0], hidden[1])
    ]
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
