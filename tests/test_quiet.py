"""Quiet by default: vLLM (and Ray, transformers, torch's C++ core) print their warnings and errors, not their
INFO lines, and not on stdout, which carries curate's results; ``curate --verbose`` or ``CURATE_LOG=info``
brings the INFO lines back; a variable the user set wins over the default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from curate.cli import main
from curate.kernel import logs
from curate.store.workspace import Workspace

VLLM_LINE = re.compile(r"^\(\w+ pid=\d+\) (DEBUG|INFO|WARNING|ERROR) ", re.MULTILINE)  # vLLM's own format
LIBRARY_VARIABLES = ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM", "TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL",
                     "HF_HUB_DISABLE_PROGRESS_BARS")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No level set by the user or by an earlier test (monkeypatch restores the environment after)."""
    for name in (logs.ENV, *LIBRARY_VARIABLES):
        monkeypatch.setenv(name, "")  # recorded, so what the test (or main) sets is undone after it
        monkeypatch.delenv(name)
    return monkeypatch


def test_warning_is_the_default_and_the_users_own_variables_win(clean_environment: pytest.MonkeyPatch) -> None:
    assert logs.level() == "warning" and not logs.verbose()
    quiet = logs.library_environment()
    assert quiet["VLLM_LOGGING_LEVEL"] == "WARNING" and quiet["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"
    assert quiet["TRANSFORMERS_VERBOSITY"] == "error" and quiet["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    clean_environment.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's own setting, no CURATE_LOG: kept
    assert logs.library_environment()["VLLM_LOGGING_LEVEL"] == "DEBUG"
    clean_environment.setenv(logs.ENV, "info")  # CURATE_LOG said: it decides
    loud = logs.library_environment()
    assert loud["VLLM_LOGGING_LEVEL"] == "INFO" and loud["TRANSFORMERS_VERBOSITY"] == "info" and logs.verbose()
    clean_environment.setenv(logs.ENV, "Debug")
    assert logs.library_environment()["VLLM_LOGGING_LEVEL"] == "DEBUG" and logs.python_level() == 10


def test_verbose_sets_the_level_for_this_process_and_those_it_starts(clean_environment: pytest.MonkeyPatch, capsys) -> None:
    assert main(["recipes"]) == 0
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING" and logs.ENV not in os.environ
    assert main(["--verbose", "recipes"]) == 0  # an earlier quiet run's variables do not keep a verbose one quiet
    assert os.environ[logs.ENV] == "info" and os.environ["VLLM_LOGGING_LEVEL"] == "INFO"


def test_a_bad_level_is_refused_by_name(clean_environment: pytest.MonkeyPatch, capsys) -> None:
    clean_environment.setenv(logs.ENV, "loud")
    assert main(["recipes"]) == 2
    error = capsys.readouterr().err
    assert "CURATE_LOG='loud'" in error and "warning, info, debug" in error


ADVICE = logs.VLLM_ADVICE[-1]
LOG_SOME = f"""
from curate.kernel.logs import quiet_libraries, quiet_vllm_advice
quiet_libraries()
quiet_vllm_advice()  # what open_llm does before it makes an engine
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging_if_needed, init_logger
configure_logging_if_needed(LoggingConfig())  # what vllm.LLM(...) does first
log = init_logger("vllm.curate_test")
log.info("an info line")
log.warning("a warning line")
log.warning("advice: %s", {ADVICE!r})
log.error("an error line: %s", "in full")
"""


@pytest.mark.slow  # a process that imports vLLM: ~8 s of CPU each
@pytest.mark.parametrize("level", ["warning", "info"])
def test_vllm_prints_its_warnings_and_errors_on_stderr_and_its_info_only_when_asked(level: str) -> None:
    pytest.importorskip("vllm")
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_VARIABLES and k != logs.ENV}
    if level == "info":
        env[logs.ENV] = "info"
    done = subprocess.run([sys.executable, "-c", LOG_SOME], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not VLLM_LINE.search(done.stdout), done.stdout
    assert "WARNING" in done.stderr and "a warning line" in done.stderr and "ERROR" in done.stderr and "an error line: in full" in done.stderr
    assert ("an info line" in done.stderr) == (level == "info"), done.stderr
    assert (ADVICE in done.stderr) == (level == "info"), done.stderr  # vLLM's advice for setups curate does not use


def _score(ws: Workspace, model: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_VARIABLES and k != logs.ENV}
    done = subprocess.run([sys.executable, "-m", "curate.cli", *flags, "score", "-w", str(ws.root), "--model", str(model),
                           "--engine", "vllm", "--dtype", "float32", "--where", "example_id < '01'", "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env={**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "examples scored" in done.stdout
    return done


@pytest.mark.slow
def test_a_score_run_prints_no_vllm_info(fresh: Workspace, tiny_model_dir: Path) -> None:
    """Measured on this tiny model before the change: 23 INFO and 12 WARNING lines of vLLM on stdout, its
    weight-loading bar, torch's C++ NUMA warning and two FutureWarnings on stderr. (What --verbose brings back: the
    info run of LOG_SOME above, and --verbose setting CURATE_LOG for the processes it starts: the test before it.)"""
    pytest.importorskip("vllm")
    quiet = _score(fresh, tiny_model_dir)
    levels = [m.group(1) for m in VLLM_LINE.finditer(quiet.stderr)]
    assert "INFO" not in levels and "DEBUG" not in levels, quiet.stderr
    assert not VLLM_LINE.search(quiet.stdout), quiet.stdout  # stdout: the results only
    assert "Loading safetensors checkpoint shards" not in quiet.stderr and "FutureWarning" not in quiet.stderr
    assert [line.split()[0] for line in quiet.stdout.splitlines()][:2] == ["score", "examples"]
    assert not [a for a in logs.VLLM_ADVICE if a in quiet.stderr], quiet.stderr  # advice for setups curate does not use
    print(f"vLLM lines: {len(levels)} (all WARNING or above)")
