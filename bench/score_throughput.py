"""Scoring throughput on the real SmolLM2 and GSM8K chats, every path in one run, one table.

    .venv/bin/python bench/score_throughput.py [--examples 256] [--paths ...]

Paths (each in its own process, so peak RSS is its own; model load and engine start-up are not timed):
  plain-loop            one example at a time through HF transformers, fp32, logits -> log_softmax ->
                        entropy: how research scripts do it (the baseline every ratio is against)
  ours-transformers     curate's transformers engine (length-sorted batches) + our head, bf16 (the default)
  ours-vllm             curate's vLLM path: pooling hidden states + our head (full-vocabulary entropy,
                        log-prob, top-5), bf16 (the default `curate score` precision)
  ours-vllm-fp32        the same in float32 (reference precision)
  vllm-prompt-logprobs  vLLM prompt_logprobs=1, bf16: NLL only, no exact entropy (a speed reference)
The ceiling is this machine's measured bf16 matmul peak divided by 2*params FLOP per token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from children import peak_rss_mb, run_child

# path -> precision it runs in
PATHS = {"plain-loop": "float32", "ours-transformers": "bfloat16", "ours-vllm": "bfloat16", "ours-vllm-fp32": "float32",
         "vllm-prompt-logprobs": "bfloat16"}


def chats(count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from curate.models.bundled import BUILTIN_SOURCES
    from curate.kernel.chat_tokens import tokenize_chat
    from curate.models.registry import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2"))
    rows = [json.loads(line) for line in BUILTIN_SOURCES["gsm8k"].path().read_text().splitlines()[:count]]
    messages = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]
    return [tokenize_chat(tokenizer, m).token_ids for m in messages]


def run_path(path: str, sequences: list[list[int]]) -> float:
    """Seconds to score all sequences (model load excluded)."""
    import torch

    from curate.models.registry import resolve

    dtype = PATHS[path]
    model_dir = resolve("smollm2")
    if path == "plain-loop":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        start = time.perf_counter()
        with torch.no_grad():
            for ids in sequences:
                logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
                _ = logp.gather(1, torch.tensor(ids[1:])[:, None]), -(logp.exp() * logp).sum(-1)
        return time.perf_counter() - start
    if path.startswith("ours-"):
        from curate.models.head import token_signals
        from curate.models.scorer import open_scorer

        scorer = open_scorer(model_dir, engine=path.split("-")[1], dtype=dtype, top_k=5)
        device = scorer.head.weight.device
        start = time.perf_counter()
        for begin in range(0, len(sequences), 128):
            batch = sequences[begin : begin + 128]
            for hidden, ids in zip(scorer.engine.hidden_states(batch), batch):
                token_signals(hidden.to(device), torch.tensor(ids), scorer.head, top_k=5)
        return time.perf_counter() - start
    if path == "vllm-prompt-logprobs":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from curate.kernel.vllm_factory import open_llm

        llm = open_llm(model_dir, dtype=dtype, max_len=2048)
        params = SamplingParams(max_tokens=1, prompt_logprobs=1)
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        return time.perf_counter() - start
    raise ValueError(path)


def bf16_ceiling_tokens_per_s(params: int) -> tuple[float, float]:
    """This machine's bf16 matmul peak: the best of several timed trials on two shapes (a square matmul and
    the vocabulary projection), since one short timing on a shared VM can land well below the peak."""
    import torch

    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (256, 576, 49152)):
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        for _ in range(5):
            start, reps = time.perf_counter(), 10
            for _ in range(reps):
                a @ b
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start))
    return best / 1e9, best / (2 * params)


def child(path: str, count: int) -> None:
    sequences = chats(count)
    seconds = run_path(path, sequences)
    print(json.dumps({"path": path, "tokens": sum(map(len, sequences)), "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.examples)
        return
    results = []
    for path in args.paths:
        result = run_child(__file__, [path, "--examples", str(args.examples)], label=path)
        if result is None:
            continue
        results.append(result)
        print(f"  {path}: {results[-1]['tokens'] / results[-1]['seconds']:,.0f} tokens/s", file=sys.stderr)
    gflops, ceiling = bf16_ceiling_tokens_per_s(134_515_008)
    base = next((r["tokens"] / r["seconds"] for r in results if r["path"] == "plain-loop"), None)
    print(f"\nSmolLM2-135M-Instruct, {args.examples} GSM8K chats, {results[0]['tokens']:,} tokens, "
          f"{os.cpu_count()} CPUs; bf16 matmul peak {gflops:,.0f} GFLOP/s = ceiling {ceiling:,.0f} tokens/s\n")
    print("| path | dtype | tokens/s | x plain loop | % of ceiling | peak RSS (MB) |\n|---|---|---|---|---|---|")
    for r in results:
        rate = r["tokens"] / r["seconds"]
        ratio = f"{rate / base:.2f}" if base else "n/a"
        print(f"| {r['path']} | {PATHS[r['path']]} | {rate:,.0f} | {ratio} | {100 * rate / ceiling:.0f}% | {r['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
