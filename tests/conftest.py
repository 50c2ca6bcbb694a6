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


# ---- the real SmolLM2 and GSM8K, shared by every test that loads them ------------------------------------

SUBSET = "example_id < '03'"  # 19 GSM8K examples, ~4,500 chat tokens: enough to compare, quick on 2 cores


@pytest.fixture(scope="session")
def gsm8k_workspace(tmp_path_factory: pytest.TempPathFactory):
    from curate.ingest import ingest
    from curate.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("gsm8k"))
    ingest(["gsm8k"], workspace=ws, progress=False)
    return ws


@pytest.fixture
def fresh(gsm8k_workspace, tmp_path: Path):
    """A workspace holding only the ingested GSM8K examples (tables from other tests do not leak in)."""
    import shutil

    from curate.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    shutil.copytree(gsm8k_workspace.table_dir("examples"), ws.table_dir("examples"))
    return ws


@pytest.fixture(scope="session")
def reference(smollm2_dir: Path):
    """The transformers scorer: the reference every vLLM result is checked against."""
    from curate.score import open_scorer

    return open_scorer(str(smollm2_dir), engine="transformers", dtype="float32", top_k=5)


@pytest.fixture(scope="session")
def vllm_scorer(smollm2_dir: Path):
    """One float32 vLLM pooling engine for the session (start-up takes ~15 s on 2 cores)."""
    pytest.importorskip("vllm")
    from curate.score import open_scorer

    return open_scorer(str(smollm2_dir), engine="vllm", dtype="float32", top_k=5)


@pytest.fixture(scope="session")
def vllm_bf16_scorer(smollm2_dir: Path):
    """The vLLM engine at the default scoring precision, bfloat16."""
    pytest.importorskip("vllm")
    from curate.score import open_scorer

    return open_scorer(str(smollm2_dir), engine="vllm", dtype="bfloat16", top_k=5)


@pytest.fixture(scope="session")
def teacher(smollm2_dir: Path):
    """One vLLM generation engine for the session."""
    pytest.importorskip("vllm")
    from curate.generate import open_teacher

    return open_teacher(str(smollm2_dir), max_len=2048)


# ---- a tiny randomly initialised model with the real SmolLM2 tokenizer (fast trainer tests) --------------


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's config cut to 2 layers, hidden 128, 2 heads of 64 (6.6M params; vLLM's CPU attention
    refuses head_dim 16), seeded, saved as a normal checkpoint with the real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 128, 256
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 2, 64
    config.max_position_embeddings = 2048
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(target)
    return target


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
