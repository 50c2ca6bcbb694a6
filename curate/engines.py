"""Engines that turn token sequences into final hidden states; the head math is shared (curate.head).

- ``vllm``: vLLM's pooling runner returns every token's final hidden state (``token_embed`` with
  ``use_activation=False``: with activation on, the states are L2-normalised and entropies are garbage).
  This is the production path: continuous batching, paged attention, GPU or CPU.
- ``transformers``: plain torch over length-sorted, padded batches. The reference the vLLM path is tested
  against, and what runs where vLLM is absent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

from train.devices import device, vllm_machine_options

if TYPE_CHECKING:
    import torch

ENGINES = ("vllm", "transformers")
DTYPES = ("float32", "bfloat16", "float16")
# Scoring precision unless asked otherwise: what production runs on GPUs, and 2x the fp32 throughput on a CPU
# with AVX-512 BF16. float32 is the reference precision (per token within ~1e-4 of the HF model in fp32).
DEFAULT_DTYPE = "bfloat16"


class Engine(Protocol):
    name: str
    version: str
    dtype: str
    max_len: int

    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list["torch.Tensor"]: ...


@dataclass(frozen=True)
class ModelFingerprint:
    path: str
    weights_hash: str  # hash of config.json and every weights file (size + SHA-256 of first and last MiB)
    dtype: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "weights_hash": self.weights_hash, "dtype": self.dtype}


def fingerprint(model_dir: str | Path, dtype: str) -> ModelFingerprint:
    directory = Path(model_dir)
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for file in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return ModelFingerprint(str(directory), digest.hexdigest()[:16], dtype)


def context_length(model_dir: str | Path) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_len: int | None = None, batch_tokens: int = 8192) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = transformers.__version__
        self.dtype = dtype
        self.device = device()
        self.max_len = max_len or context_length(model_dir)
        self.batch_tokens = batch_tokens
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(self.device).eval()
        self.body = getattr(model, model.base_model_prefix)  # the decoder without its head

    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list["torch.Tensor"]:
        import torch

        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        results: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
        batch: list[int] = []
        width = 0
        for index in order:  # length-sorted batches under a padded-token budget
            width_with = max(width, len(sequences[index]))
            if batch and width_with * (len(batch) + 1) > self.batch_tokens:
                self._run(batch, sequences, results)
                batch, width_with = [], len(sequences[index])
            batch.append(index)
            width = width_with
        if batch:
            self._run(batch, sequences, results)
        return results

    def _run(self, batch: list[int], sequences: Sequence[Sequence[int]], results: list) -> None:
        import torch

        width = max(len(sequences[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        with torch.inference_mode():
            states = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        for row, i in enumerate(batch):
            results[i] = states[row, : len(sequences[i])]


class VllmEngine:
    name = "vllm"

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_len: int | None = None, enforce_eager: bool | None = None) -> None:
        import vllm
        from vllm import LLM
        from vllm.config import PoolerConfig

        self.version = vllm.__version__
        self.dtype = dtype
        self.max_len = max_len or context_length(model_dir)
        self.llm = LLM(
            model_dir,
            runner="pooling",
            pooler_config=PoolerConfig(task="token_embed", use_activation=False),
            dtype=dtype,
            max_model_len=self.max_len,
            **vllm_machine_options(enforce_eager),
        )

    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list["torch.Tensor"]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [output.outputs.data for output in outputs]


def open_engine(engine: str, model_dir: str, *, dtype: str, max_len: int | None = None) -> Engine:
    if engine == "vllm":
        return VllmEngine(model_dir, dtype=dtype, max_len=max_len)
    if engine == "transformers":
        return TransformersEngine(model_dir, dtype=dtype, max_len=max_len)
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
