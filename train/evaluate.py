"""``train eval``: mean answer NLL on held-out examples (teacher-forced, response tokens) and exact-match
accuracy of greedy generations, graded as curate grades traces (curate.kernel.answers.grade: numbers, and
multiple-choice letters when the reference answer is one).

A LoRA adapter directory (``adapter_config.json``) is loaded on its base model; for vLLM it is merged into
a temporary checkpoint first (vLLM's LoRA path is not used: with prompt log-probs it is buggy upstream).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from curate.kernel.answers import grade
from curate.kernel.chat_tokens import encode_text, prompt_turns, render, tokenize_chat
from curate.kernel.machine import device
from curate.kernel.vllm_factory import EngineOptions, close_llm, open_llm
from train.data import read_table
from train.objectives import token_stats
from train.sft import load_checkpoint, load_tokenizer

ENGINES = ("auto", "vllm", "transformers")


def load_for_eval(model: str) -> tuple[Any, Any]:
    tokenizer = load_tokenizer(model)  # first: a model that is not there is named with the fix (train.sft.load_tokenizer)
    return load_checkpoint(model).to(device()).eval(), tokenizer


def answer_nll(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *, max_len: int) -> list[float]:
    """Mean NLL of each conversation's response tokens (assistant content + end-of-turn)."""
    means = []
    for messages in conversations:
        chat = tokenize_chat(tokenizer, messages)
        ids = torch.tensor([chat.token_ids[:max_len]], device=model.device)
        targets = torch.tensor(chat.is_response[:max_len], device=model.device)
        targets[0] = False
        with torch.inference_mode():
            nll = token_stats(model(input_ids=ids).logits, ids, with_entropy=False).nll[0]
        means.append(float(nll[targets].mean()) if bool(targets.any()) else float("nan"))
    return means


def generate_greedy(model_dir: str, model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], *, max_new_tokens: int, engine: str,
                    options: EngineOptions | None = None) -> tuple[list[str], str]:
    texts = [render(tokenizer, p, generation_prompt=True) for p in prompts]
    use_vllm = engine == "vllm" or (engine == "auto" and _has_vllm())
    if use_vllm:
        return _generate_vllm(model_dir, model, tokenizer, texts, max_new_tokens, options or EngineOptions()), "vllm"
    return _generate_transformers(model, tokenizer, texts, max_new_tokens), "transformers"


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _generate_vllm(model_dir: str, model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int, options: EngineOptions) -> list[str]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with tempfile.TemporaryDirectory() as merged:
        path = model_dir
        if (Path(model_dir) / "adapter_config.json").is_file():
            model.save_pretrained(merged)
            tokenizer.save_pretrained(merged)
            path = merged
        llm = open_llm(path, dtype="float32", max_len=options.max_model_len or 2048, options=options)
        prompts = [TokensPrompt(prompt_token_ids=encode_text(tokenizer, t)) for t in texts]
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
        close_llm(llm)
    return [o.outputs[0].text for o in outputs]


def _generate_transformers(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int, batch: int = 16) -> list[str]:
    tokenizer.padding_side = "left"
    results = []
    for begin in range(0, len(texts), batch):
        encoded = tokenizer(texts[begin : begin + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        results += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return results


def evaluate(model: str, data: str, *, split: str | None = None, limit: int | None = None, max_new_tokens: int = 256,
             engine: str = "auto", max_len: int = 2048, accuracy: bool = True, options: EngineOptions | None = None) -> dict[str, Any]:
    """Mean answer NLL always; exact-match accuracy of greedy generations when ``accuracy`` (the costly part)."""
    metrics, _ = evaluate_examples(model, data, split=split, limit=limit, max_new_tokens=max_new_tokens, engine=engine,
                                   max_len=max_len, accuracy=accuracy, options=options)
    return metrics


def evaluate_examples(model: str, data: str, *, split: str | None = None, limit: int | None = None, max_new_tokens: int = 256,
                      engine: str = "auto", max_len: int = 2048, accuracy: bool = True,
                      options: EngineOptions | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``evaluate``'s metrics, and per held-out example its ``example_id`` (the row number as text where the data
    has none), ``answer_nll`` and ``correct`` (None where accuracy is off or the example has no reference answer)."""
    started = time.perf_counter()
    table = read_table(data, split=split, limit=limit)
    conversations = table.column("messages").to_pylist()
    references = table.column("reference_answer").to_pylist() if "reference_answer" in table.column_names else [None] * table.num_rows
    ids = [str(i) for i in (table.column("example_id").to_pylist() if "example_id" in table.column_names else range(table.num_rows))]
    loaded, tokenizer = load_for_eval(model)
    nll = answer_nll(loaded, tokenizer, conversations, max_len=max_len)
    metrics: dict[str, Any] = {"model": model, "data": data, "split": split, "examples": table.num_rows,
                               "mean_answer_nll": sum(nll) / len(nll) if nll else None}
    per_example: list[dict[str, Any]] = [{"example_id": i, "answer_nll": v, "correct": None} for i, v in zip(ids, nll)]
    checked = [(index, prompt_turns(c), r) for index, (c, r) in enumerate(zip(conversations, references)) if r is not None] if accuracy else []
    if checked:
        completions, used = generate_greedy(model, loaded, tokenizer, [p for _, p, _ in checked], max_new_tokens=max_new_tokens,
                                            engine=engine, options=options)
        graded = [grade(text, reference) for text, (_, _, reference) in zip(completions, checked)]
        correct = [bool(ok) for _, ok in graded]
        for (index, _, _), ok in zip(checked, correct):
            per_example[index]["correct"] = ok
        metrics |= {"accuracy": sum(correct) / len(correct), "with_reference": len(checked), "correct": sum(correct),
                    "no_answer": sum(answer is None for answer, _ in graded), "generation_engine": used,
                    "max_new_tokens": max_new_tokens}
    else:
        metrics |= {"accuracy": None, "with_reference": 0}
    metrics["seconds"] = time.perf_counter() - started
    return metrics, per_example
