"""Shared fixtures. Tests use a model cache inside the repository (.cache/models) unless CURATE_MODELS is
set, so a fresh clone converts SmolLM2 once and later runs reuse it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CURATE_MODELS", str(REPO / ".cache" / "models"))


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings/bytes (written as they are, for bad-input tests)."""
    with open(path, "wb") as handle:
        for row in rows:
            if isinstance(row, bytes):
                handle.write(row + b"\n")
            elif isinstance(row, str):
                handle.write(row.encode("utf-8") + b"\n")
            else:
                handle.write(json.dumps(row).encode("utf-8") + b"\n")
    return path


@pytest.fixture
def workspace(tmp_path: Path):
    from curate.workspace import Workspace

    return Workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from curate import models

    return models.pull("smollm2")
