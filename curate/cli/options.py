"""Arguments several verbs share (workspace, engine, precision, a served model, Ray) and the one way a verb is
defined: a summary, an example for its --help, and the function that runs it."""

from __future__ import annotations

import argparse
from typing import Callable

from curate.models.engines import DEFAULT_DTYPE, DTYPES, ENGINES
from curate.models.served import Endpoint
from curate.stages.shards import RaySettings
from curate.store.workspace import Workspace


def verb(verbs: argparse._SubParsersAction, name: str, summary: str, example: str, handler: Callable) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        name,
        help=summary.replace("%", "%%"),  # argparse %-formats help lines (not descriptions)
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="vllm", help="vllm (production) or transformers (reference)")
    dtype_arg(parser, DEFAULT_DTYPE, "model and head precision")


def served_args(parser: argparse.ArgumentParser, what: str, *, endpoint: bool = True) -> None:
    group = parser.add_argument_group(f"{what} behind an OpenAI-compatible endpoint (vllm serve, or a hosted API)")
    if endpoint:  # (score has it among its model choices)
        group.add_argument("--endpoint", help="the server's URL, e.g. http://127.0.0.1:8000 (instead of an in-process model)")
    group.add_argument("--served-model", help="the model's name on that server (its /v1/models lists them)")
    group.add_argument("--api-key-env", help="the environment variable holding the API key (the key is never written anywhere)")
    group.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    group.add_argument("--requests-per-minute", type=float, help="rate limit (default none)")
    group.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it is retried (default 120)")
    group.add_argument("--max-retries", type=int, default=5,
                       help="retries per request on 429, 5xx, timeouts and dropped connections, with backoff (default 5)")


def ray_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data-parallel on a Ray cluster (pip install 'curate-sft[ray]')")
    group.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="run on Ray replicas: alone, a local cluster; 'auto', the one `ray start` runs here; or ray://HOST:10001")
    group.add_argument("--replicas", type=int, default=1, help="engines working at once (one GPU each where there are GPUs; default 1)")


def ray_settings(args: argparse.Namespace, opener: dict):
    if args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas}: give at least 1")
    return RaySettings(args.ray or None, args.replicas, opener)


def endpoint_of(args: argparse.Namespace, *, url: str | None = None, served_model: str | None = None) -> Endpoint:
    served_model = served_model or args.served_model
    if not served_model:
        raise ValueError("--endpoint needs --served-model NAME (the server's /v1/models lists the names)")
    return Endpoint(url or args.endpoint, served_model, api_key_env=args.api_key_env, concurrency=args.concurrency,
                    requests_per_minute=args.requests_per_minute, timeout=args.timeout, max_retries=args.max_retries)


def dtype_arg(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=default,
                        help=f"{what} (default {default}: bfloat16 where it is native, i.e. GPUs and CPUs with AVX-512 BF16 "
                             "or AMX, float32 elsewhere, where bf16 is emulated and several times slower; bf16 single tokens "
                             "drift by ~0.03 nats on average, sample means keep their order; float32 is the reference precision). "
                             "The run key records the resolved precision")


def workspace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", "-w", required=True, type=Workspace, help="workspace directory (created if missing)")


def key_values(pairs: list[str], option: str, shape: str = "NAME=VALUE") -> dict[str, str]:
    """``--map A=B`` / ``--param NAME=VALUE`` given several times, as a dict (a malformed one names the fix)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or (shape == "SOURCE=TARGET" and not value):
            raise ValueError(f"{option} expects {shape}, got {pair!r}")
        values[key] = value
    return values
