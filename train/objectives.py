"""Per-token losses and the online token/sample selection of EKSFT and Q-Tuning, as their reference code does
it (../shared/METHODS.md), with the cleaner variants as named options.

Indexing everywhere: position t of a [B, L] tensor is about token t, predicted by the logits at t-1; position 0
is predicted by nothing. A row of n tokens has n - 1 predicted positions, 1..n-1 (what the reference code
calls its non-pad positions after the shift). ``targets`` marks the response (label) positions. The EKSFT
reference applies its mask one position off; here the signals of token t come from the logits that predicted
it (the intended alignment).

Every objective returns its loss summed over the micro-batch and the units the optimizer step divides by
(trained tokens, sequences, or micro-batches), so gradient accumulation reproduces the normalisation each
method's reference uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

EKSFT_COMBINE = ("union", "intersection")
EKSFT_NORMALISE = ("sequence", "token")  # the reference weights each sequence equally (batch 1 x grad-acc 8)
QTUNING_ENTROPY = ("all", "response")  # reference: every predicted position, prompt included
QTUNING_SEARCH = ("last", "best-under")  # reference: the bisection's last iterate
QTUNING_NORMALISE = ("reference", "token")  # reference: kept non-pad positions (prompt included) per micro-batch


@dataclass
class TokenStats:
    nll: torch.Tensor  # [B, L] -log p(token t | < t), with grad; 0 at position 0 and padding
    entropy: torch.Tensor  # [B, L] full-vocabulary entropy of the distribution that predicted token t (detached; 0 if not asked)
    log_probs: torch.Tensor  # [B, L-1, V] log-softmax of the logits that predict tokens 1..L-1


@dataclass
class Objective:
    """One micro-batch's loss: ``loss`` (a sum) is divided by the optimizer step's total ``units``."""

    loss: torch.Tensor
    units: float
    keep: torch.Tensor  # [B, L] the tokens trained on
    info: dict[str, float] = field(default_factory=dict)


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


def kl_to_reference(log_probs: torch.Tensor, reference_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(current ‖ reference) per token [B, L] (0 at position 0), both over the full vocabulary, without
    gradient; and the reference's log-probs [B, L-1, V] (for the KL term of the loss)."""
    with torch.no_grad():
        reference = reference_logits[:, :-1].float().log_softmax(dim=-1)
        kl = (log_probs.exp() * (log_probs - reference)).sum(dim=-1)
    return torch.cat([torch.zeros_like(kl[:, :1]), kl], dim=1), reference


def sft_objective(stats: TokenStats, targets: torch.Tensor, weights: torch.Tensor) -> Objective:
    """Plain SFT: weight x NLL over the targets, normalised by the step's trained tokens."""
    loss = (stats.nll * targets.float() * weights[:, None]).sum()
    count = int(targets.sum())
    return Objective(loss, count, targets, {"targets": count, "kept_tokens": count})


# ---- EKSFT ------------------------------------------------------------------------------------------------


def top_positions(values: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k candidate positions with the largest values, ties to the earlier position."""
    if k <= 0 or len(candidates) == 0:
        return candidates[:0]
    order = torch.sort(-values[candidates], stable=True).indices
    return candidates[order[:k]]


def eksft_masks(entropy: torch.Tensor, kl: torch.Tensor, targets: torch.Tensor, *, ratio: float, combine: str = "union",
                protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: k = floor(ratio x its response tokens); the top-k by entropy and the top-k by KL among its
    response tokens (``protected`` ones excluded, e.g. the end-of-turn token) are masked out, their union (the
    paper's script) or intersection. Returns (masked, top by entropy, top by KL), each [B, L] bool."""
    if combine not in EKSFT_COMBINE:
        raise ValueError(f"unknown EKSFT combination {combine!r}; choose one of {', '.join(EKSFT_COMBINE)}")
    by_entropy, by_kl = torch.zeros_like(targets), torch.zeros_like(targets)
    for row in range(targets.shape[0]):
        positions = targets[row].nonzero()[:, 0]
        k = math.floor(ratio * len(positions))
        candidates = positions if protected is None else positions[~protected[row, positions]]
        by_entropy[row, top_positions(entropy[row], candidates, k)] = True
        by_kl[row, top_positions(kl[row], candidates, k)] = True
    masked = by_entropy | by_kl if combine == "union" else by_entropy & by_kl
    return masked, by_entropy, by_kl


def eksft_objective(stats: TokenStats, reference_logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *,
                    ratio: float, combine: str, lambda_entropy: float, lambda_kl: float, normalise: str,
                    protected: torch.Tensor | None = None) -> Objective:
    """EKSFT's loss: CE over the unmasked response tokens - λ_H x mean over the entropy-masked positions of H_t / log V
    (an entropy bonus, with gradient) + λ_KL x mean over the KL-masked positions of KL(current ‖ frozen initial
    model) (the intended KL; the reference computes Σ p (p - log q)). ``normalise``: ``sequence`` (the
    reference: each sequence's terms are means over its own tokens, and sequences weigh equally) or ``token``
    (CE over all trained tokens of the step; the two extra terms as micro-batch means)."""
    if normalise not in EKSFT_NORMALISE:
        raise ValueError(f"unknown EKSFT normalisation {normalise!r}; choose one of {', '.join(EKSFT_NORMALISE)}")
    kl, reference = kl_to_reference(stats.log_probs.detach(), reference_logits)
    masked, by_entropy, by_kl = eksft_masks(stats.entropy, kl, targets, ratio=ratio, combine=combine, protected=protected)
    keep = targets & ~masked
    at_entropy = stats.log_probs[by_entropy[:, 1:]]  # [M, V], with gradient: the distributions that predicted them
    entropy_term = -(at_entropy.exp() * at_entropy).sum(-1) / math.log(stats.log_probs.shape[-1])
    at_kl = stats.log_probs[by_kl[:, 1:]]
    kl_term = (at_kl.exp() * (at_kl - reference[by_kl[:, 1:]])).sum(-1)
    nll = stats.nll * keep.float()
    if normalise == "sequence":
        ce = nll.sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        rows = ce - lambda_entropy * _row_means(entropy_term, by_entropy) + lambda_kl * _row_means(kl_term, by_kl)
        loss, units = (rows * weights).sum(), targets.shape[0]
    else:
        extra = -lambda_entropy * _mean(entropy_term) + lambda_kl * _mean(kl_term)
        loss = (nll * weights[:, None]).sum() + int(keep.sum()) * extra
        units = int(keep.sum())
    info = {"targets": int(targets.sum()), "kept_tokens": int(keep.sum()), "kl_sum": float(kl[targets].sum()),
            "masked_by_entropy": int(by_entropy.sum()), "masked_by_kl": int(by_kl.sum())}
    return Objective(loss, units, keep, info)


def _row_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of ``values`` (flattened in mask order) over that row's masked positions (0 if none)."""
    counts = mask.sum(dim=1)
    rows = torch.repeat_interleave(torch.arange(mask.shape[0], device=mask.device), counts)
    sums = torch.zeros(mask.shape[0], device=mask.device, dtype=torch.float32).index_add(0, rows, values.float())
    return sums / counts.clamp(min=1)


def _mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() else values.new_zeros(())


# ---- Q-Tuning ---------------------------------------------------------------------------------------------


@dataclass
class Quadrants:
    q2: np.ndarray  # [B] bool: misconception (high PPL, low entropy): kept, tokens pruned
    q4: np.ndarray  # [B] bool: calibration (low PPL, high entropy): kept whole
    filled: np.ndarray  # [B] bool: added by the fill-up
    q2_like: np.ndarray  # [B] bool: filled samples on the Q2 side (s2 >= s4), pruned like Q2
    alpha: float

    @property
    def kept(self) -> np.ndarray:
        return self.q2 | self.q4 | self.filled

    @property
    def pruned(self) -> np.ndarray:
        return self.q2 | self.q2_like


def qtuning_quadrants(ppl: np.ndarray, entropy: np.ndarray, *, r_sample: float, search: str = "last",
                      tolerance: float = 0.01, iterations: int = 10) -> Quadrants:
    """Q-Tuning's sample step. α = β moved together by bisection on [0, 0.49] (at most ``iterations``, stopping
    when |kept share - r_sample| < ``tolerance``): Q2 = PPL > q(1-α) ∧ H ≤ q(α), Q4 = PPL ≤ q(α) ∧ H > q(1-α),
    linear-interpolation quantiles. ``search``: ``last`` (the reference: the last iterate, which can overshoot)
    or ``best-under`` (the iterate keeping the most without going over). Then filled up to max(1, round(B
    r_sample)) by |ppl_n - H_n| (min-max normalised), largest first; a filled sample is Q2-like when s2 >= s4."""
    if search not in QTUNING_SEARCH:
        raise ValueError(f"unknown Q-Tuning search {search!r}; choose one of {', '.join(QTUNING_SEARCH)}")
    size = len(ppl)
    low, high = 0.0, 0.49
    iterates = []
    for _ in range(iterations):
        alpha = (low + high) / 2
        q2 = (ppl > np.quantile(ppl, 1 - alpha)) & (entropy <= np.quantile(entropy, alpha))
        q4 = (ppl <= np.quantile(ppl, alpha)) & (entropy > np.quantile(entropy, 1 - alpha))
        share = (q2.sum() + q4.sum()) / size
        iterates.append((alpha, q2, q4, share))
        if abs(share - r_sample) < tolerance:
            break
        low, high = (alpha, high) if share < r_sample else (low, alpha)
    if search == "last":
        alpha, q2, q4, _ = iterates[-1]
    else:
        under = [it for it in iterates if it[3] <= r_sample] or [min(iterates, key=lambda it: it[3])]
        alpha, q2, q4, _ = max(under, key=lambda it: it[3])
    filled = np.zeros(size, dtype=bool)
    q2_like = np.zeros(size, dtype=bool)
    want = min(max(1, int(round(size * r_sample))), size)
    short = want - int((q2 | q4).sum())
    if short > 0:
        p_n, h_n = _min_max(ppl), _min_max(entropy)
        distance = np.where(q2 | q4, -np.inf, np.abs(p_n - h_n))
        chosen = np.argsort(-distance, kind="stable")[:short]
        filled[chosen] = True
        q2_like[chosen] = p_n[chosen] >= h_n[chosen]
    return Quadrants(q2, q4, filled, q2_like, float(alpha))


def _min_max(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return np.zeros_like(values) if span < 1e-12 else (values - values.min()) / span


def qtuning_token_keep(nll: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, quadrants: Quadrants, *,
                       r_sample: float, r_token: float, smoothing: float) -> tuple[torch.Tensor, int, int]:
    """Q-Tuning's token step, a budget over the batch: keep round(T r_sample r_token) of its T predicted
    positions (prompt included); the positions of dropped samples count as removed; the rest is removed
    from the response tokens of the Q2 and Q2-like rows, highest s_t = (1-λ) ppl_t + λ (ppl_{t-1} + ppl_{t+1})
    first (ties: earlier row, then earlier position), where a prompt position has ppl 1 and a position before
    the start or past the end 0. At ``r_token`` = 1.0 no token is removed, whatever the budget says (the
    reference prunes only when its token ratio != 1.0, trainer.py:683). Returns (the kept targets [B, L], tokens
    removed from responses, the reference's loss normaliser: the kept rows' predicted positions minus the
    removed tokens)."""
    kept_rows = torch.as_tensor(quadrants.kept, device=targets.device)
    pruned_rows = torch.as_tensor(quadrants.pruned, device=targets.device)
    predicted = (lengths - 1).clamp(min=0)
    total = int(predicted.sum())
    target = int(round(total * r_sample * r_token))
    remaining = 0 if r_token == 1.0 else max(0, (total - target) - int(predicted[~kept_rows].sum()))
    width = targets.shape[1]
    inside = torch.arange(width, device=targets.device)[None, :] < lengths[:, None]
    inside[:, 0] = False  # nothing predicts token 0
    # float64, as the SQL recipe computes it: mathematically equal scores (s = 0.5 x + 0.5 (1 + y) and 0.5 y +
    # 0.5 (1 + x)) then round alike and go by position, instead of by float32 noise
    ppl = torch.where(targets, nll.detach().double().exp(), inside.double())
    left = torch.cat([torch.zeros_like(ppl[:, :1]), ppl[:, :-1]], dim=1)
    right = torch.cat([ppl[:, 1:], torch.zeros_like(ppl[:, :1])], dim=1)
    score = (1 - smoothing) * ppl + smoothing * (left + right)
    candidates = (targets & pruned_rows[:, None]).reshape(-1).nonzero()[:, 0]  # row-major: earlier row, then position
    dropped = top_positions(score.reshape(-1), candidates, min(remaining, len(candidates)))
    keep = targets & kept_rows[:, None]
    keep.view(-1)[dropped] = False
    normaliser = int(predicted[kept_rows].sum()) - len(dropped)
    return keep, len(dropped), normaliser


def sample_ppl_and_entropy(nll: torch.Tensor, entropy: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, *,
                           entropy_over: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Per sample: PPL over its target tokens, and its mean entropy over every predicted position (the
    reference, prompt included) or over the targets only (``response``)."""
    if entropy_over not in QTUNING_ENTROPY:
        raise ValueError(f"unknown Q-Tuning entropy average {entropy_over!r}; choose one of {', '.join(QTUNING_ENTROPY)}")
    count = targets.sum(dim=1).clamp(min=1)
    ppl = torch.exp((nll.detach() * targets.float()).sum(dim=1) / count)
    if entropy_over == "response":
        positions = targets
    else:
        positions = torch.arange(targets.shape[1], device=targets.device)[None, :] < lengths[:, None]
        positions[:, 0] = False
    mean_entropy = (entropy * positions.float()).sum(dim=1) / positions.sum(dim=1).clamp(min=1)
    return ppl.double().cpu().numpy(), mean_entropy.double().cpu().numpy()


def qtuning_objective(stats: TokenStats, targets: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor, *,
                      r_sample: float, r_token: float, smoothing: float, entropy_over: str, search: str,
                      normalise: str) -> Objective:
    """Q-Tuning on one micro-batch: quadrants, fill-up, the batch token budget, and the loss normalised by
    the kept non-pad positions (the reference, per micro-batch, averaged over accumulation) or by the step's
    trained tokens (``token``)."""
    if normalise not in QTUNING_NORMALISE:
        raise ValueError(f"unknown Q-Tuning normalisation {normalise!r}; choose one of {', '.join(QTUNING_NORMALISE)}")
    ppl, entropy = sample_ppl_and_entropy(stats.nll, stats.entropy, targets, lengths, entropy_over=entropy_over)
    quadrants = qtuning_quadrants(ppl, entropy, r_sample=r_sample, search=search)
    keep, removed, normaliser = qtuning_token_keep(stats.nll, targets, lengths, quadrants, r_sample=r_sample,
                                                   r_token=r_token, smoothing=smoothing)
    total = (stats.nll * keep.float() * weights[:, None]).sum()
    loss, units = (total / max(normaliser, 1), 1) if normalise == "reference" else (total, int(keep.sum()))
    info = {"targets": int(targets.sum()), "kept_tokens": int(keep.sum()), "q2": int(quadrants.q2.sum()),
            "q4": int(quadrants.q4.sum()), "filled": int(quadrants.filled.sum()), "q2_like": int(quadrants.q2_like.sum()),
            "dropped_samples": int((~quadrants.kept).sum()), "pruned_tokens": removed, "alpha": quadrants.alpha}
    return Objective(loss, units, keep, info)
