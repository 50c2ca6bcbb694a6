"""Per-token losses and the online token/sample selection of EKSFT and Q-Tuning.

Alignment everywhere: position t of ``targets``/``nll``/``entropy`` is about token t, predicted by the
logits at t-1 (the EKSFT reference code applies its mask one position off; this is the intended alignment).
All masks are boolean tensors shaped like the batch's [batch, length] token grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    nll: torch.Tensor  # [B, L] -log p(token t | < t), with grad; 0 at position 0 and padding
    entropy: torch.Tensor  # [B, L] full-vocabulary entropy of the distribution that predicted token t (detached; 0 if not asked)
    log_probs: torch.Tensor  # [B, L-1, V] log-softmax of the logits that predict tokens 1..L-1


def token_stats(logits: torch.Tensor, input_ids: torch.Tensor, *, with_entropy: bool = True) -> TokenStats:
    """NLL and entropy per token from logits [B, L, V]; element t uses logits t-1.

    Plain SFT needs no entropy: ``with_entropy=False`` skips a pass over the [B, L, V] probabilities."""
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    nll = -log_probs.gather(2, input_ids[:, 1:, None])[..., 0]
    pad = torch.zeros_like(nll[:, :1])
    per_token_nll = torch.cat([pad, nll], dim=1)
    if not with_entropy:
        return TokenStats(per_token_nll, torch.zeros_like(per_token_nll.detach()), log_probs)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return TokenStats(per_token_nll, torch.cat([pad.detach(), entropy], dim=1), log_probs)


def kl_to_reference(log_probs: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(current ‖ reference) per token [B, L] (0 at position 0), both over the full vocabulary."""
    with torch.no_grad():
        reference = reference_logits[:, :-1].float().log_softmax(dim=-1)
        kl = (log_probs.exp() * (log_probs - reference)).sum(dim=-1)
    return torch.cat([torch.zeros_like(kl[:, :1]), kl], dim=1)


def eksft_mask(entropy: torch.Tensor, kl: torch.Tensor, targets: torch.Tensor, *, ratio: float) -> torch.Tensor:
    """EKSFT: of the target tokens, drop the top ``ratio`` by entropy ∪ the top ``ratio`` by KL.

    k = ceil(ratio × number of target tokens in the micro-batch), so between k and 2k tokens are dropped.
    Returns the targets that stay."""
    flat_targets = targets.reshape(-1)
    candidates = flat_targets.nonzero()[:, 0]
    k = math.ceil(ratio * len(candidates))
    keep = targets.clone()
    if k == 0 or len(candidates) == 0:
        return keep
    dropped = set()
    for signal in (entropy.reshape(-1)[candidates], kl.reshape(-1)[candidates]):
        dropped.update(candidates[signal.topk(k).indices].tolist())
    flat_keep = keep.reshape(-1)
    flat_keep[torch.tensor(sorted(dropped), dtype=torch.long)] = False
    return keep


def sample_ppl_and_entropy(nll: torch.Tensor, entropy: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: PPL and mean entropy over its target (response) tokens."""
    count = targets.sum(dim=1).clamp(min=1)
    mask = targets.float()
    ppl = torch.exp((nll.detach() * mask).sum(dim=1) / count)
    return ppl, (entropy * mask).sum(dim=1) / count


def qtuning_samples(ppl: torch.Tensor, entropy: torch.Tensor, *, r_sample: float, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Tuning's sample step: boolean (Q2, Q4) memberships keeping about ``r_sample`` of the batch.

    Q2 (misconception: high PPL, low entropy) = PPL > q(1-α) ∧ H ≤ q(α); Q4 (calibration: low PPL, high
    entropy) = PPL ≤ q(α) ∧ H > q(1-α). α = β is found by bisection on [0, 0.49] so that |Q2 ∪ Q4| is
    as close to ``round(r_sample × B)`` as it gets from below; if short, the batch is filled up with the
    samples farthest from the diagonal, |ppl_norm − H_norm|, put in Q2 or Q4 by which side they lie on."""
    size = len(ppl)
    want = max(1, round(r_sample * size))

    def quadrants(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        p_hi, p_lo = torch.quantile(ppl, 1 - alpha), torch.quantile(ppl, alpha)
        h_hi, h_lo = torch.quantile(entropy, 1 - alpha), torch.quantile(entropy, alpha)
        return (ppl > p_hi) & (entropy <= h_lo), (ppl <= p_lo) & (entropy > h_hi)

    low, high = 0.0, 0.49
    q2, q4 = quadrants(low)
    for _ in range(iterations):
        middle = (low + high) / 2
        m2, m4 = quadrants(middle)
        if int((m2 | m4).sum()) <= want:
            low, q2, q4 = middle, m2, m4
        else:
            high = middle
    short = want - int((q2 | q4).sum())
    if short > 0:
        ppl_norm = (ppl - ppl.min()) / (ppl.max() - ppl.min()).clamp(min=1e-12)
        h_norm = (entropy - entropy.min()) / (entropy.max() - entropy.min()).clamp(min=1e-12)
        distance = (ppl_norm - h_norm).abs().masked_fill(q2 | q4, -1.0)
        for index in distance.argsort(descending=True)[:short].tolist():
            if ppl_norm[index] >= h_norm[index]:
                q2[index] = True
            else:
                q4[index] = True
    return q2, q4


def qtuning_tokens(nll: torch.Tensor, targets: torch.Tensor, q2: torch.Tensor, *, r_token: float, smoothing: float) -> torch.Tensor:
    """Q-Tuning's token step, inside Q2 samples only: score s_i = (1-λ)·ppl_i + λ·(ppl_{i-1} + ppl_{i+1})
    over the sample's target tokens (a missing neighbour counts as the token itself) and keep the
    ceil(r_token × n) lowest-scoring tokens of each Q2 sample. Returns the kept targets of the Q2 rows."""
    keep = torch.zeros_like(targets)
    for row in q2.nonzero()[:, 0].tolist():
        positions = targets[row].nonzero()[:, 0]
        if len(positions) == 0:
            continue
        ppl = nll[row, positions].detach().exp()
        before = torch.cat([ppl[:1], ppl[:-1]])
        after = torch.cat([ppl[1:], ppl[-1:]])
        score = (1 - smoothing) * ppl + smoothing * (before + after)
        kept = score.argsort()[: math.ceil(r_token * len(positions))]
        keep[row, positions[kept]] = True
    return keep
