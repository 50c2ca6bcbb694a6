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


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _code_without_imports(source: str) -> str:
    """What a file computes: its syntax tree less import statements (where a module lives, and where it finds
    the others, is not a change of signals), comments and layout (ast.dump keeps neither)."""
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom)) and not _is_docstring(node)]
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                setattr(node, field, [n for n in block if not isinstance(n, (ast.Import, ast.ImportFrom)) and not _is_docstring(n)] or [ast.Pass()])
    return ast.dump(tree)


def _definition_digest() -> str:
    """The contents of the files that define the signals, not their paths: moving a file is not a change."""
    digest = hashlib.sha256()
    for relative in keys.SIGNAL_DEFINITION_FILES:
        digest.update(_code_without_imports((REPO / relative).read_text()).encode() + b"\0")
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
