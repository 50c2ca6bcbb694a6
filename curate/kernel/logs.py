"""How loud the libraries under curate are: vLLM, Ray, transformers and torch's C++ core.

By default they speak at WARNING (transformers and torch's C++ core at ERROR) and vLLM writes to stderr, so a
model command prints its own progress and results, not a hundred lines of engine start-up (a ``curate score``
on a tiny model printed 35 vLLM INFO/WARNING lines, one ``make demo`` 136). Warnings and errors from them
still print in full. ``curate --verbose`` (or ``CURATE_LOG=info``) brings back their INFO lines;
``CURATE_LOG=debug`` goes one further.

vLLM reads its level when it is first imported (``VLLM_LOGGING_LEVEL``), transformers and torch theirs too,
so the levels travel as environment variables: set in this process before the libraries load
(``quiet_libraries``) and passed to the processes curate starts (a ``vllm serve``, Ray workers:
``library_environment``). A variable the user set wins over the default level; an explicit ``CURATE_LOG``
(or ``--verbose``) wins over everything.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

ENV = "CURATE_LOG"
LEVELS = ("warning", "info", "debug")  # warning: the default
# vLLM warnings that are advice about setups curate does not use (an engine in this process, eager mode, no
# Triton, no tcmalloc) or internals, repeated for every engine (a study printed 73 such lines): dropped at the
# default level, shown with --verbose
VLLM_ADVICE = ("doesn't allow to use `torch.set_num_threads`", "is not found in LD_PRELOAD", "The global random seed is set to",
               "Unknown vLLM environment variable detected", "is already registered. Overwriting", "Triton is not installed",
               "Model Runner V2 requires Triton", "Enforce eager set", "Inductor compilation was disabled")


def level() -> str:
    """The level asked for: ``CURATE_LOG``, else ``warning``."""
    value = os.environ.get(ENV, "warning").strip().lower() or "warning"
    if value not in LEVELS:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not a log level: use one of {', '.join(LEVELS)} (warning is the default)")
    return value


def verbose() -> bool:
    return level() != "warning"


def python_level() -> int:
    """The ``logging`` level for the libraries' Python loggers (vLLM, Ray)."""
    return getattr(logging, level().upper())


def _wanted(chosen: str) -> dict[str, str]:
    quiet = chosen == "warning"
    return {
        "VLLM_LOGGING_LEVEL": chosen.upper(),
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # stdout carries curate's results (``curate sql ... > file``)
        "TRANSFORMERS_VERBOSITY": "error" if quiet else chosen,
        "TORCH_CPP_LOG_LEVEL": "ERROR" if quiet else "INFO",  # torch's C++ warnings ("NUMA binding: ...")
        "HF_HUB_DISABLE_PROGRESS_BARS": "1" if quiet else "0",  # transformers' checkpoint loading/writing bars
    }


def library_environment() -> dict[str, str]:
    """The libraries' variables for this level: what to set here and pass to a process curate starts. A
    variable already set is kept unless ``CURATE_LOG`` was given."""
    explicit = ENV in os.environ
    return {name: value if explicit or name not in os.environ else os.environ[name] for name, value in _wanted(level()).items()}


def quiet_libraries() -> None:
    """Set the libraries' levels in this process: before they are imported (the environment), and on those
    already imported (their loggers). Idempotent; call it before opening an engine or a cluster."""
    os.environ.update(library_environment())
    chosen = python_level()
    if "vllm" in sys.modules:  # imported before us: its handlers are set up, their logger's level still decides
        logging.getLogger("vllm").setLevel(int(getattr(logging, os.environ["VLLM_LOGGING_LEVEL"].upper(), chosen)))
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(getattr(logging, os.environ["TRANSFORMERS_VERBOSITY"].upper(), logging.ERROR))
    if chosen >= logging.WARNING:
        # deprecations vLLM triggers in torch (torch.distributed.reduce_op), attributed to vLLM's modules
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(advice in message for advice in VLLM_ADVICE)


def quiet_vllm_advice() -> None:
    """At the default level, drop the VLLM_ADVICE lines from vLLM's own handlers: call it before opening an
    engine. vLLM sets its handlers up when an engine is first made (with its default logging config); this sets
    them up the same way first, so the engine finds them in place and keeps them (and the filter on them)."""
    if verbose():
        return
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging_if_needed

    configure_logging_if_needed(LoggingConfig())
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, _DropAdvice) for f in handler.filters):
            handler.addFilter(_DropAdvice())
