"""The real SmolLM2: converted from the bundled GGUF, loaded by transformers and by vLLM, generating."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from curate.models import registry

pytestmark = pytest.mark.model


def test_pull_is_idempotent_and_listed(smollm2_dir: Path, capsys) -> None:
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime
    started = time.perf_counter()
    assert registry.pull("smollm2") == smollm2_dir
    assert time.perf_counter() - started < 1.0  # cached: no second conversion
    assert (smollm2_dir / "model.safetensors").stat().st_mtime == stamp
    assert registry.cached_models()["smollm2"] == smollm2_dir
    assert registry.resolve("smollm2") == str(smollm2_dir)
    assert registry.resolve(str(smollm2_dir)) == str(smollm2_dir.resolve())
    from curate.cli import main

    assert main(["models", "list"]) == 0
    assert str(smollm2_dir) in capsys.readouterr().out


def test_transformers_loads_and_generates(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.config.tie_word_embeddings and model.num_parameters() == pytest.approx(134.5e6, rel=0.01)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_vllm_loads_and_generates(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(str(smollm2_dir), enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=1024, dtype="float32")
    outputs = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]], SamplingParams(max_tokens=8, temperature=0))
    assert "Paris" in outputs[0].outputs[0].text


def test_unknown_model_error_names_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(registry.ModelNotFoundError) as err:
        registry.resolve("no-such-org/no-such-model")
    message = str(err.value)
    assert "bundled alias" in message and "local directory" in message and "model cache" in message and "hub id" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(registry.ModelNotFoundError, match="has no config.json"):
        registry.resolve(str(empty))
    with pytest.raises(registry.ModelNotFoundError, match="no bundled model named 'llama'"):
        registry.pull("llama")
