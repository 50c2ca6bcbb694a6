"""Scorer handles: a model that turns token ids into per-token signals, opened in this process (vLLM's pooling
runner or transformers, with our output head), or behind vLLM's server (exact through a pooling server, or
prompt log-probs only). ``ScoreSpec`` is everything about a scorer that decides its rows; its hash is the
score key. The scoring stage (``curate.stages.score``) drives these handles.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from curate.kernel.chat_tokens import PROMPT_FORMATS, template_hash
from curate.kernel.fingerprint import model_fingerprint
from curate.kernel.keys import run_key
from curate.kernel.machine import LOW_PRECISIONS, resolve_precision
from curate.kernel.machine import device as machine_device
from curate.kernel.vllm_factory import EngineOptions
from curate.models.engines import (
    DEFAULT_DTYPE,
    Engine,
    ModelIdentity,
    context_length,
    engine_version,
    identify,
    open_engine,
    torch_dtype,
)
from curate.models.head import (
    CANDIDATES,
    OutputHead,
    TokenSignals,
    load_head,
    token_signals,
)
from curate.models.registry import resolve
from curate.models.served import (
    POOLING_ARGS,
    Client,
    ServedIdentity,
    describe,
    run_requests,
)

OVERLONG = ("skip", "truncate")


@dataclass(frozen=True)
class ScoreSpec:
    """Everything that decides the rows of one scoring run; its hash is the score key."""

    model: dict[str, str]  # ModelIdentity.spec(): fingerprint and precision
    engine: str
    top_k: int
    max_len: int
    overlong: str
    head_candidates: int  # logits recomputed in fp32 per position by a low-precision head (curate.models.head)
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
        return score_spec(self.identity, self.engine.name, self.top_k, self.engine.max_len, self.overlong,
                          self.head.is_low_precision, self.options, self.tokenizer, self.prompt_format)

    @property
    def key(self) -> str:
        return run_key(self.spec)

    served = False

    def close(self) -> None:
        self.engine.close()


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

    * exact (a server started with the pooling runner, ``curate.models.served.POOLING_ARGS``): the server returns each token's
      final hidden state (``/pooling``, task token_embed, float32) and our head, loaded from the model's local
      copy, computes log-prob, full-vocabulary entropy and top-k exactly as an in-process run does;
    * log-prob only (any generating vLLM server): its prompt log-probs give the exact log-prob of every token
      and its top-k; full-vocabulary entropy cannot come from a top-k, so these runs have none
      (``signals = logprob-only``) and recipes that need entropy or KL refuse them.
    """

    endpoint: Any  # curate.models.served.Endpoint
    identity: Any  # curate.models.served.ServedIdentity
    tokenizer: Any
    top_k: int
    engine: EngineCard | ServedPooling  # ServedPooling: exact (hidden states); EngineCard: prompt log-probs only
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
        if self.head is None:
            return self._logprobs(sequences)
        device = self.head.weight.device
        return [token_signals(h.to(device), torch_tensor(s), self.head, top_k=self.top_k) if h is not None else None
                for h, s in zip(self.engine.hidden_states(sequences), sequences)]

    def _logprobs(self, sequences: list[list[int]]) -> list[Any]:
        import torch

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


@dataclass
class ServedPooling:
    """A pooling server (``curate.models.served.POOLING_ARGS``) as an engine: every token's final hidden state
    for token ids, through ``/pooling``; None for a sequence whose request failed after its retries (it is
    not written, and the next run sends it again)."""

    endpoint: Any  # curate.models.served.Endpoint
    max_len: int
    name: str = "vllm-server-pooling"
    version: str = "openai-compatible"
    dtype: str = "server"
    client: Any = None

    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list[Any]:
        hidden: list[Any] = [None] * len(sequences)

        def done(index: int, outcome: Any) -> None:
            if outcome.body is not None:
                hidden[index] = decode_hidden_states(outcome.body, len(sequences[index]))

        self.client = self.client or Client(self.endpoint)
        run_requests(self.endpoint, "/pooling", [pooling_payload(self.endpoint.served_model, list(s)) for s in sequences], done,
                     client=self.client)
        return hidden

    def close(self) -> None:
        pass


def torch_tensor(values: Sequence[int]) -> Any:
    import torch

    return torch.tensor(list(values))


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
        return ServedScorer(endpoint, ServedIdentity(info), tokenizer, top_k, ServedPooling(endpoint, limit), overlong,
                            prompt_format, head=head, head_fingerprint=model_fingerprint(model_dir))
    if not 0 <= top_k <= 20:
        raise ValueError(f"--top-k {top_k}: vLLM's server returns at most 20 prompt log-probs per token by default")
    return ServedScorer(endpoint, ServedIdentity(info), tokenizer, top_k, EngineCard(limit), overlong, prompt_format)


def open_scorer(model: str, *, engine: str = "vllm", dtype: str = DEFAULT_DTYPE, top_k: int = 5, max_len: int | None = None,
                overlong: str = "skip", options: EngineOptions | None = None, together: int = 1, prompt_format: str = "chat") -> Scorer:
    from transformers import AutoTokenizer

    _check_formats(overlong, prompt_format)
    options = options or EngineOptions()
    model_dir = resolve(model)
    head = load_head(model_dir, dtype=torch_dtype(dtype))  # refuses unknown architectures before the engine starts
    opened = open_engine(engine, model_dir, dtype=dtype, max_len=max_len or options.max_model_len, options=options,
                         together=together)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Scorer(opened, head.to(machine_device()), tokenizer, identify(model, model_dir, opened.dtype), top_k, overlong, options,
                  prompt_format)


def scorer_card(model: str, *, engine: str = "vllm", dtype: str = DEFAULT_DTYPE, top_k: int = 5, max_len: int | None = None,
                overlong: str = "skip", options: EngineOptions | None = None, together: int = 1, prompt_format: str = "chat",
                precision: str | None = None) -> ScorerCard:
    """What ``open_scorer`` with the same keywords opens, as a card, without opening an engine: the run key
    comes from the model's files (fingerprint, config, tokenizer and chat template) and the settings. A Ray
    driver uses it; each replica checks that the scorer it opens has this key. ``precision``: ``dtype``
    resolved where the engines run (default: on this machine)."""
    from transformers import AutoTokenizer

    _check_formats(overlong, prompt_format)
    options = options or EngineOptions()
    model_dir = resolve(model)
    resolved = precision or resolve_precision(dtype)
    limit = max_len or options.max_model_len or context_length(model_dir)
    identity = identify(model, model_dir, resolved)
    spec = score_spec(identity, engine, top_k, limit, overlong, resolved in LOW_PRECISIONS, options,
                      AutoTokenizer.from_pretrained(model_dir), prompt_format)
    return ScorerCard(identity, spec, run_key(spec), EngineCard(limit, engine, engine_version(engine), resolved), prompt_format, options)


def score_spec(identity: ModelIdentity, engine: str, top_k: int, max_len: int, overlong: str, low_precision_head: bool,
               options: EngineOptions, tokenizer: Any, prompt_format: str) -> ScoreSpec:
    """The spec of an in-process scorer (opened, or described by ``scorer_card``): one definition for both."""
    return ScoreSpec(identity.spec(), engine, top_k, max_len, overlong, CANDIDATES if low_precision_head else 0,
                     options.identity(), template_hash(tokenizer), prompt_format)


def _check_formats(overlong: str, prompt_format: str) -> None:
    if overlong not in OVERLONG:
        raise ValueError(f"unknown overlong policy {overlong!r}; choose one of {', '.join(OVERLONG)}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
