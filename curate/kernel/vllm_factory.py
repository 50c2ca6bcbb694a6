"""The one place a vLLM engine is opened: scoring (pooling runner), the probe, the teacher and evaluation.

It applies the machine's settings (on CPU: the engine in the calling process, a bounded KV cache, eager mode)
and the user's engine options, and it shares a GPU between engines that are open at the same time: vLLM's
``gpu_memory_utilization`` is a share of the whole device that one engine claims, so two engines at the
usual 0.85 cannot both start. Each engine gets ``min(0.85 / together, free share - margin)``: a caller that
knows it opens two (``curate score --pair``) says ``together=2``; any other engine takes what is free.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from dataclasses import dataclass, field
from typing import Any

from curate.kernel.logs import quiet_libraries, quiet_vllm_advice, verbose
from curate.kernel.machine import device

GPU_SHARE = 0.85  # what one engine alone claims of a GPU
GPU_MARGIN = 0.05  # left free beside the engines (CUDA context, the head's buffers)
CPU_SHARE = 0.2  # on CPU the "GPU" share is a share of RAM that vLLM reserves
CPU_KV_CACHE_GIB = "2"


@dataclass(frozen=True)
class EngineOptions:
    """vLLM settings a user may set on every in-process engine (``--tensor-parallel-size`` etc.)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: the factory's share
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    engine_args: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # --engine-arg KEY=VALUE, passed as is

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")

    def identity(self) -> dict[str, Any]:
        """The options that can change results (for run keys): the parallel layout and the raw engine
        arguments. Memory share and batch width decide speed only."""
        return {"tensor_parallel_size": self.tensor_parallel_size, "engine_args": dict(self.engine_args)}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The EngineOptions flags, the same on every command that opens an in-process vLLM engine."""
    group = parser.add_argument_group("vLLM engine options (in-process engines)")
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs one engine spans (default 1)")
    group.add_argument("--gpu-memory-utilization", type=float,
                       help="share of the GPU an engine claims (default: 0.85, split between engines open together)")
    group.add_argument("--max-num-seqs", type=int, help="sequences an engine batches at once (vLLM's default if not given)")
    group.add_argument("--max-model-len", type=int, help="the engine's context limit (the same as --max-len where a command has it)")
    group.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="any other vLLM engine argument, passed as is (values read as JSON when they parse: numbers, true)")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The EngineOptions of parsed ``add_engine_arguments`` flags."""
    return EngineOptions(tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
                         max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                         engine_args=parse_engine_args(args.engine_arg))


def parse_engine_args(pairs: list[str]) -> tuple[tuple[str, Any], ...]:
    """``KEY=VALUE`` strings; a VALUE that reads as JSON (numbers, true/false, lists) is passed as that."""
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-arg expects KEY=VALUE (a vLLM engine argument), got {pair!r}")
        try:
            parsed.append((key.strip().replace("-", "_"), json.loads(value)))
        except json.JSONDecodeError:
            parsed.append((key.strip().replace("-", "_"), value))
    return tuple(parsed)


def gpu_share(together: int, free_fraction: float) -> float:
    """The share of a GPU an engine may claim, given how many open together and what is free now."""
    share = min(GPU_SHARE / max(together, 1), free_fraction - GPU_MARGIN)
    if share <= 0.05:
        raise RuntimeError(
            f"the GPU has only {free_fraction:.0%} of its memory free: close other engines or processes, "
            "or pass --gpu-memory-utilization"
        )
    return round(share, 3)


def machine_settings() -> dict[str, Any]:
    """Settings that depend on the machine, not the user. On CPU the engine runs in the calling process:
    with its own engine process the two compete for the same cores and every hidden state crosses a process
    boundary (measured with `curate score` on 256 GSM8K chats: 531 tokens/s with the engine process, 823
    without). An explicit environment setting wins."""
    if device() == "cuda":
        return {"enforce_eager": False}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return {"enforce_eager": True, "gpu_memory_utilization": CPU_SHARE}


def open_llm(model_dir: str, *, dtype: str, max_len: int, options: EngineOptions | None = None, together: int = 1,
             **settings: Any) -> Any:
    """A ``vllm.LLM`` for ``model_dir``. ``settings`` are the caller's own (``runner="pooling"``, ...).
    vLLM speaks at curate's log level (WARNING unless ``--verbose``: curate.kernel.logs), its weight-loading
    bar only when verbose."""
    quiet_libraries()  # before vLLM's first import where this is it; its logger's level where it was imported already
    quiet_vllm_advice()
    from vllm import LLM

    options = options or EngineOptions()
    arguments: dict[str, Any] = {"use_tqdm_on_load": verbose(), **machine_settings(), **settings}
    if device() == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        arguments["gpu_memory_utilization"] = options.gpu_memory_utilization or gpu_share(together, free / total)
    elif options.gpu_memory_utilization is not None:
        arguments["gpu_memory_utilization"] = options.gpu_memory_utilization
    if options.max_num_seqs is not None:
        arguments["max_num_seqs"] = options.max_num_seqs
    arguments.update(dict(options.engine_args))
    return LLM(model_dir, dtype=dtype, max_model_len=options.max_model_len or max_len,
               tensor_parallel_size=options.tensor_parallel_size, **arguments)


def close_llm(llm: Any) -> None:
    """Shut the engine down and give its memory back (engines otherwise pile up in one process)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    del llm
    gc.collect()
    if device() == "cuda":
        import torch

        torch.cuda.empty_cache()
