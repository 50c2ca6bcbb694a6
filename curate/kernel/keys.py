"""Run identities: a stage's spec (a dataclass of everything that decides its rows) hashed whole into a key.

Rows carry their run's key, so results of different models, parameters or signal definitions never mix
under one key, and a re-run with the same spec finds its finished rows and skips them.

``SIGNALS_VERSION`` is the version of the code that defines the signals (which tokens are response tokens,
how the output head computes log-probs, entropy and top-k, how sample aggregates and probe readings are
made, how answers are graded). It is part of every key; ``tests/test_keys.py`` pins it to a hash of the
files that define the signals, so changing them without bumping it fails the suite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

SIGNALS_VERSION = "2026.12.2"

# the files whose code defines the signals (relative to the repository root); see tests/test_keys.py
SIGNAL_DEFINITION_FILES = (
    "curate/kernel/chat_tokens.py",
    "curate/kernel/answers.py",
    "curate/models/head.py",
    "curate/store/score_tables.py",
    "curate/stages/probe.py",
)


def canonical(value: Any) -> Any:
    """A JSON-ready form of a spec: dataclasses become dicts, tuples lists, keys sorted by json.dumps."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def run_key(spec: Any) -> str:
    """16 hex digits of the SHA-256 of the spec (with the signals version): the run's identity in its rows."""
    body = {"spec": canonical(spec), "signals_version": SIGNALS_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_version() -> str:
    """The installed version of the curate-sft distribution (the kernel reads it from the installed metadata, not
    from ``curate``: the kernel imports nothing of the packages above it)."""
    from importlib import metadata

    try:
        return metadata.version("curate-sft")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def code_version() -> str:
    """The package version, the signals version and, in a git checkout, the commit (for run records)."""
    import subprocess
    from pathlib import Path

    version = f"curate {package_version()}, signals {SIGNALS_VERSION}"
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if commit:
            version += f", commit {commit}"
    return version
