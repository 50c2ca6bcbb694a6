"""bench/gpu_check.py, the check a GPU machine runs, kept working on CPU: `--device cpu --quick` end to end
(a tiny random model of SmolLM2's family, its real tokenizer, GSM8K chats), its tables and its JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curate.kernel.machine import resolve_precision

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_cpu_and_prints_its_tables(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--chats", "6",
                           "--steps", "2", "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "| scoring | precision | tokens/s | MFU | max abs diff logprob / entropy (nats) | max diff of chat means | limits (token / mean) | within |" in lines
    assert "| train sft | precision | steps | tokens/s (steady) | MFU | peak memory MB | first loss | last loss |" in lines
    rows = [line for line in lines if line.startswith("| engine + head on cpu |")]
    assert [row.split(" | ")[1] for row in rows] == ["float32", "bfloat16"]
    assert all(row.endswith("| yes |") for row in rows)
    trained_in = resolve_precision("auto")  # the training rows run at `auto`: bfloat16 where this CPU has it natively
    assert [line.split(" | ")[0] for line in lines if f" on cpu | {trained_in} | 2 | " in line] == ["| LoRA r=16 on cpu", "| full on cpu"]

    results = json.loads(out.read_text())
    assert results["imported_vllm_duckdb_polars"] == []  # what a GPU machine without vLLM, DuckDB and Polars can run
    assert results["chats"] == 6 and results["scored_tokens"] > 0
    fp32, bf16 = results["score_float32"], results["score_bfloat16"]
    assert fp32["ok"] and fp32["max_entropy"] <= 1e-3 and fp32["max_logprob"] <= 1e-3  # the same path on the same device
    assert bf16["ok"] and 0 < bf16["max_logprob"] <= 0.3  # bf16 differs from float32, within its tolerance
    for name in ("train_lora", "train_full"):
        run = results[name]
        assert run["steps"] == 2 and run["tokens_per_s"] > 0 and run["peak_mb"] > 0
        assert math.isfinite(run["first_loss"]) and math.isfinite(run["last_loss"])
        assert run["first_loss"] == pytest.approx(math.log(49152), abs=2.0)  # a random model starts near uniform or worse
