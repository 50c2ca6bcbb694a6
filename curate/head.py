"""The model's output head applied to final hidden states, and the per-token signals computed from it.

Engines hand us final (normed) hidden states; logits = head(hidden) exactly as the architecture defines it
(weight, tied or not; Cohere's logit_scale; Granite's logits_scaling; Gemma's final soft-capping). Work is
done in chunks of positions so the [positions, vocab] logits never grow past ``chunk`` rows.

Alignment convention: the distribution at position t-1 predicted token t, so token t's log-prob, entropy
and top-k come from hidden state t-1. Token 0 has no score (null, never 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

# architecture → how its logits are made (besides the weight): "none", "scale" (× logit_scale),
# "divide" (÷ logits_scaling) or "softcap" (tanh soft-capping by final_logit_softcapping)
ARCHITECTURES = {
    "LlamaForCausalLM": "none",
    "MistralForCausalLM": "none",
    "Qwen2ForCausalLM": "none",
    "Qwen3ForCausalLM": "none",
    "Phi3ForCausalLM": "none",
    "Olmo2ForCausalLM": "none",
    "GemmaForCausalLM": "none",
    "Gemma2ForCausalLM": "softcap",
    "Gemma3ForCausalLM": "softcap",
    "GraniteForCausalLM": "divide",
    "CohereForCausalLM": "scale",
}


class UnsupportedArchitecture(ValueError):
    pass


@dataclass
class OutputHead:
    weight: "torch.Tensor"  # [vocab, hidden]
    multiplier: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, hidden: "torch.Tensor") -> "torch.Tensor":
        """Float32 logits for hidden states [n, hidden] (the matmul runs in the weight's dtype)."""
        import torch

        out = (hidden.to(self.weight.dtype) @ self.weight.T).float()
        if self.multiplier != 1.0:
            out = out * self.multiplier
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def to(self, device: str) -> "OutputHead":
        return OutputHead(self.weight.to(device), self.multiplier, self.softcap)


def load_head(model_dir: str | Path, *, dtype: "torch.dtype") -> OutputHead:
    """Read the output head of a local checkpoint; refuse an architecture whose head we do not know."""
    from safetensors import safe_open

    directory = Path(model_dir)
    config = json.loads((directory / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    kind = ARCHITECTURES.get(architecture)
    if kind is None:
        raise UnsupportedArchitecture(
            f"{directory}: architecture {architecture!r} is not supported by the exact scoring head "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}); its logit rule must be added to "
            "curate/head.py before its entropies can be trusted"
        )
    tied = config.get("tie_word_embeddings", architecture.startswith("Gemma"))  # Gemma configs may omit it
    names = ("model.embed_tokens.weight", "embed_tokens.weight") if tied else ("lm_head.weight",)
    weight = None
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in names:
                if name in handle.keys():
                    weight = handle.get_tensor(name)
                    break
        if weight is not None:
            break
    if weight is None:
        raise UnsupportedArchitecture(f"{directory}: no {' or '.join(names)} tensor in its safetensors files")
    # Gemma scales the input embeddings, not the output: its tied weight is used as stored.
    multiplier = {"scale": config.get("logit_scale", 1.0), "divide": 1.0 / config.get("logits_scaling", 1.0)}.get(kind, 1.0)
    softcap = config.get("final_logit_softcapping") if kind == "softcap" else None
    return OutputHead(weight.to(dtype), float(multiplier), float(softcap) if softcap else None)


@dataclass
class TokenSignals:
    """Per-token signals for positions 1..n-1 of one sequence (position 0 has none)."""

    logprob: "torch.Tensor"  # [n-1] float32: log p(token t | < t)
    entropy: "torch.Tensor"  # [n-1] float32: full-vocabulary entropy of that distribution, in nats
    top_ids: "torch.Tensor"  # [n-1, k] int64
    top_logprobs: "torch.Tensor"  # [n-1, k] float32


@dataclass
class PairSignals:
    kl: "torch.Tensor"  # [n-1] KL(calibrated ‖ base) over the full vocabulary
    log_ratio: "torch.Tensor"  # [n-1] log q_calibrated(token) - log p_base(token)


def _log_softmax_chunks(hidden: "torch.Tensor", head: OutputHead, chunk: int) -> Iterator[tuple[int, "torch.Tensor"]]:
    for begin in range(0, hidden.shape[0], chunk):
        yield begin, head.logits(hidden[begin : begin + chunk]).log_softmax(dim=-1)


def token_signals(hidden: "torch.Tensor", token_ids: "torch.Tensor", head: OutputHead, *, top_k: int, chunk: int = 512) -> TokenSignals:
    """Signals for a sequence from its hidden states [n, h] and token ids [n]."""
    import torch

    predicting = hidden[:-1]  # hidden t-1 predicts token t
    targets = token_ids[1:].to(hidden.device)
    parts: list[tuple[torch.Tensor, ...]] = []
    for begin, logp in _log_softmax_chunks(predicting, head, chunk):
        target = targets[begin : begin + logp.shape[0]]
        chosen = logp.gather(1, target[:, None])[:, 0]
        entropy = -(logp.exp() * logp).sum(dim=-1)
        top = logp.topk(top_k, dim=-1) if top_k else None
        parts.append((chosen, entropy, *(top if top else (torch.empty(len(target), 0), torch.empty(len(target), 0)))))
    if not parts:
        empty = torch.empty(0)
        return TokenSignals(empty, empty, torch.empty(0, top_k, dtype=torch.long), torch.empty(0, top_k))
    chosen, entropy, top_values, top_indices = (torch.cat(p) for p in zip(*parts))
    return TokenSignals(chosen.cpu(), entropy.cpu(), top_indices.long().cpu(), top_values.cpu())


def pair_signals(
    base_hidden: "torch.Tensor", calibrated_hidden: "torch.Tensor", token_ids: "torch.Tensor",
    base_head: OutputHead, calibrated_head: OutputHead, *, chunk: int = 512,
) -> PairSignals:
    """Exact KL(calibrated ‖ base) and the log-ratio of the actual token, per position 1..n-1."""
    import torch

    targets = token_ids[1:].to(base_hidden.device)
    kls, ratios = [], []
    base_chunks = _log_softmax_chunks(base_hidden[:-1], base_head, chunk)
    calibrated_chunks = _log_softmax_chunks(calibrated_hidden[:-1], calibrated_head, chunk)
    for (begin, log_p), (_, log_q) in zip(base_chunks, calibrated_chunks):
        target = targets[begin : begin + log_p.shape[0]][:, None]
        kls.append((log_q.exp() * (log_q - log_p)).sum(dim=-1))  # ≥ 0 up to float32 rounding
        ratios.append((log_q.gather(1, target) - log_p.gather(1, target))[:, 0])
    if not kls:
        return PairSignals(torch.empty(0), torch.empty(0))
    return PairSignals(torch.cat(kls).cpu(), torch.cat(ratios).cpu())

