"""What this machine runs on, and the precision that fits it: one rule for curate's engines, the teacher,
the trainer and the evaluator.

``auto`` precision is bfloat16 where bfloat16 is native (a CUDA GPU; a CPU with AVX-512 BF16 or AMX, as
torch reports it) and float32 elsewhere: on an AVX2-only CPU bfloat16 is emulated (measured there with
``curate score`` on 59 GSM8K chats: 34 tokens/s in bf16, 196 in fp32). Runs record the resolved precision.
"""

from __future__ import annotations

import functools

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
LOW_PRECISIONS = ("bfloat16", "float16")  # a head in these recomputes its likely logits in float32 (curate.models.head)


def device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def native_bf16() -> bool:
    """bfloat16 runs natively here: a CUDA GPU with bf16 support, or a CPU whose instruction set torch reports
    as having AVX-512 BF16 or AMX tiles."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(name: str) -> str:
    """``auto`` -> bfloat16 where native, else float32; an explicit precision is returned as given."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    return "bfloat16" if native_bf16() else "float32"


def describe() -> str:
    """One line naming the machine, for benchmark tables and run records."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads, {'native' if native_bf16() else 'emulated'} bf16"
