"""Run identities: every key carries the signals version, which is pinned to the code that defines the
signals; the shared kernel stays light and is all the trainer takes from curate."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import REPO
from curate.kernel import keys

PIN = REPO / "tests" / "golden" / "signals_version.json"


def _definition_digest() -> str:
    digest = hashlib.sha256()
    for relative in keys.SIGNAL_DEFINITION_FILES:
        digest.update(relative.encode() + b"\0" + (REPO / relative).read_bytes())
    return digest.hexdigest()


def test_signals_version_is_pinned_to_the_code_that_defines_the_signals() -> None:
    digest = _definition_digest()
    pinned = json.loads(PIN.read_text())
    assert pinned["files_sha256"] == digest and pinned["version"] == keys.SIGNALS_VERSION, (
        f"the files that define the signals ({', '.join(keys.SIGNAL_DEFINITION_FILES)}) changed. If the change can move "
        "any score, mask or grade, bump SIGNALS_VERSION in curate/kernel/keys.py (old rows then stay under old keys); "
        f'either way, write {{"version": "{keys.SIGNALS_VERSION}", "files_sha256": "{digest}"}} into {PIN}'
    )


def test_every_key_carries_the_signals_version(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True)
    class Spec:
        model: str
        top_k: int

    before = keys.run_key(Spec("abc", 5))
    assert before == keys.run_key({"model": "abc", "top_k": 5})  # a dataclass hashes as its fields
    assert keys.run_key(Spec("abc", 6)) != before
    monkeypatch.setattr(keys, "SIGNALS_VERSION", "next")
    assert keys.run_key(Spec("abc", 5)) != before


def test_the_kernel_imports_nothing_heavy() -> None:
    code = ("import sys, curate.kernel.chat_tokens, curate.kernel.answers, curate.kernel.machine, curate.kernel.keys, "
            "curate.kernel.runs, curate.kernel.lock, curate.kernel.atomic, curate.kernel.fingerprint, curate.kernel.vllm_factory; "
            "print([m for m in ('torch', 'transformers', 'vllm', 'duckdb', 'polars', 'pyarrow') if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_trainer_takes_only_the_kernel_from_curate() -> None:
    for path in sorted((REPO / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith("curate") or name.startswith("curate.kernel"), f"{path.name} imports {name}"
