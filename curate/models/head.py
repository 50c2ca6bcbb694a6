"""The model's output head applied to final hidden states, and the per-token signals computed from it.

Engines hand us final (normed) hidden states; logits = head(hidden) exactly as the architecture defines it
(weight, tied or not; Cohere's logit_scale; Granite's logits_scaling; Gemma's final soft-capping). Work is
done in chunks of positions so the [positions, vocab] logits never grow past ``chunk`` rows.

Alignment convention: the distribution at position t-1 predicted token t, so token t's log-prob, entropy
and top-k come from hidden state t-1. Token 0 has no score (null, never 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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


# A bf16/fp16 head recomputes in fp32 the logits of at least this many top tokens per position (and the target's).
CANDIDATES = 16
# Positions per head call: [CHUNK, vocab] fp32 buffers stay ~50 MB for a 49k vocabulary.
CHUNK = 256


@dataclass
class OutputHead:
    weight: "torch.Tensor"  # [vocab, hidden]
    multiplier: float = 1.0
    softcap: float | None = None
    _scratch: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def is_low_precision(self) -> bool:
        import torch

        return self.weight.dtype in (torch.bfloat16, torch.float16)

    def to(self, device: str) -> "OutputHead":
        return OutputHead(self.weight.to(device), self.multiplier, self.softcap)

    def distribution(self, hidden: "torch.Tensor", targets: "torch.Tensor | None" = None, *, top_k: int = 0) -> "Distribution":
        """The next-token distributions at the positions whose final hidden states are ``hidden`` [n, h].

        The result lives in this head's scratch buffers: it is valid until the head's next call.
        A bf16/fp16 head runs the vocabulary matmul in its own precision (3x faster than fp32 on a CPU), then
        recomputes in fp32 the logits of its top ``max(CANDIDATES, top_k)`` tokens and of ``targets`` [n]: they
        carry the probability mass that log-probs and entropy depend on, and this undoes the rounding of those
        logits to 8 mantissa bits. A float32 head computes every logit in fp32.
        """
        import torch

        rows = hidden.shape[0]
        logits = self._buffer("logits", rows, torch.float32)
        candidates = None
        if self.is_low_precision:
            low = torch.mm(hidden.to(self.weight.dtype), self.weight.T, out=self._buffer("low", rows, self.weight.dtype))
            candidates = low.topk(max(CANDIDATES, top_k), dim=-1, sorted=False).indices
            logits.copy_(low)
            exact_ids = candidates if targets is None else torch.cat([candidates, targets[:, None]], dim=1)
            exact = torch.einsum("nh,nch->nc", hidden.float(), self.weight[exact_ids].float())
            logits.scatter_(1, exact_ids, exact)
        else:
            torch.mm(hidden.to(self.weight.dtype), self.weight.T, out=logits)
        if self.multiplier != 1.0:
            logits.mul_(self.multiplier)
        if self.softcap:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        probs = torch.exp(logits, out=self._buffer("probs", rows, torch.float32))
        return Distribution(logits, probs, probs.sum(dim=-1).log_(), candidates)

    def _buffer(self, name: str, rows: int, dtype: "torch.dtype") -> "torch.Tensor":
        """A reused [rows, vocab] buffer: allocating fresh 50 MB tensors per chunk costs more than the math."""
        import torch

        buffer = self._scratch.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.dtype != dtype:
            buffer = torch.empty(rows, self.vocab_size, dtype=dtype, device=self.weight.device)
            self._scratch[name] = buffer
        return buffer[:rows]


@dataclass
class Distribution:
    """Next-token distributions of n positions as shifted logits z (row max 0) and exp(z), both [n, vocab]."""

    logits: "torch.Tensor"
    probs: "torch.Tensor"  # exp(z), not normalised
    log_norm: "torch.Tensor"  # [n] log Σ exp(z)
    candidates: "torch.Tensor | None"  # [n, c] distinct ids whose logits are exact (low-precision heads), else None

    def logprob(self, ids: "torch.Tensor") -> "torch.Tensor":
        """log p(ids) for ids [n, m]."""
        return self.logits.gather(1, ids) - self.log_norm[:, None]

    def top(self, k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """The k most likely tokens per position: (log-probs [n, k], ids [n, k]), most likely first."""
        if self.candidates is None:
            values, ids = self.logits.topk(k, dim=-1)
            return values - self.log_norm[:, None], ids
        values, order = self.logprob(self.candidates).topk(k, dim=-1)
        return values, self.candidates.gather(1, order)

    def entropy(self) -> "torch.Tensor":
        """Full-vocabulary entropy in nats: log Σ e^z - Σ e^z·z / Σ e^z. Overwrites ``probs``: call it last."""
        weighted = self.probs.mul_(self.logits).sum(dim=-1)
        return self.log_norm - weighted / self.log_norm.exp()

    def kl_from(self, base: "Distribution") -> "torch.Tensor":
        """KL(self ‖ base) = Σ q (log q - log p) over the full vocabulary. Overwrites both: call it last."""
        difference = self.logits.sub_(base.logits)  # z_q - z_p
        weighted = self.probs.mul_(difference).sum(dim=-1)
        return weighted / self.log_norm.exp() - self.log_norm + base.log_norm


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
            "curate/models/head.py before its entropies can be trusted"
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
    """Per-position signals: for a sequence, positions 1..n-1 (position 0 has none)."""

    logprob: "torch.Tensor"  # [m] float32: log p(token t | < t); empty when no targets were given
    entropy: "torch.Tensor"  # [m] float32: full-vocabulary entropy of that distribution, in nats
    top_ids: "torch.Tensor"  # [m, k] int64
    top_logprobs: "torch.Tensor"  # [m, k] float32


@dataclass
class PairSignals:
    kl: "torch.Tensor"  # [n-1] KL(calibrated ‖ base) over the full vocabulary
    log_ratio: "torch.Tensor"  # [n-1] log q_calibrated(token) - log p_base(token)


def token_signals(hidden: "torch.Tensor", token_ids: "torch.Tensor", head: OutputHead, *, top_k: int, chunk: int = CHUNK) -> TokenSignals:
    """Signals for a sequence from its hidden states [n, h] and token ids [n]."""
    # hidden t-1 predicts token t
    return position_signals(hidden[:-1], head, targets=token_ids[1:].to(hidden.device), top_k=top_k, chunk=chunk)


def position_signals(
    predicting: "torch.Tensor", head: OutputHead, *, targets: "torch.Tensor | None" = None, top_k: int, chunk: int = CHUNK,
) -> TokenSignals:
    """Signals of the next-token distributions that hidden states [m, h] give, ``chunk`` positions at a time;
    the log-prob of ``targets`` [m] when they are given."""
    import torch

    parts: list[tuple[torch.Tensor, ...]] = []
    for begin in range(0, predicting.shape[0], chunk):
        rows = predicting[begin : begin + chunk]
        target = None if targets is None else targets[begin : begin + chunk]
        distribution = head.distribution(rows, target, top_k=top_k)
        chosen = torch.empty(0, device=rows.device) if target is None else distribution.logprob(target[:, None])[:, 0]
        empty = torch.empty(len(rows), 0, device=rows.device)
        top_values, top_ids = distribution.top(top_k) if top_k else (empty, empty.long())
        parts.append((chosen, distribution.entropy(), top_values, top_ids))
    if not parts:
        empty = torch.empty(0)
        return TokenSignals(empty, empty, torch.empty(0, top_k, dtype=torch.long), torch.empty(0, top_k))
    chosen, entropy, top_values, top_ids = (torch.cat(p) for p in zip(*parts))
    return TokenSignals(chosen.cpu(), entropy.cpu(), top_ids.long().cpu(), top_values.cpu())


def pair_signals(
    base_hidden: "torch.Tensor", calibrated_hidden: "torch.Tensor", token_ids: "torch.Tensor",
    base_head: OutputHead, calibrated_head: OutputHead, *, chunk: int = CHUNK,
) -> PairSignals:
    """Exact KL(calibrated ‖ base) and the log-ratio of the actual token, per position 1..n-1."""
    import torch

    if calibrated_head is base_head:  # each distribution needs scratch buffers of its own
        calibrated_head = OutputHead(base_head.weight, base_head.multiplier, base_head.softcap)
    targets = token_ids[1:].to(base_hidden.device)
    kls, ratios = [], []
    for begin in range(0, base_hidden.shape[0] - 1, chunk):
        target = targets[begin : begin + chunk]
        log_p = base_head.distribution(base_hidden[begin : begin + target.shape[0]], target)
        log_q = calibrated_head.distribution(calibrated_hidden[begin : begin + target.shape[0]], target)
        ratios.append((log_q.logprob(target[:, None]) - log_p.logprob(target[:, None]))[:, 0])
        kls.append(log_q.kl_from(log_p))  # ≥ 0 up to float32 rounding
    if not kls:
        return PairSignals(torch.empty(0), torch.empty(0))
    return PairSignals(torch.cat(kls).cpu(), torch.cat(ratios).cpu())
