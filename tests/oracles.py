"""Independent oracles of the four methods' reference rules, written from ../shared/METHODS.md (not from our
SQL or torch code): plain Python over lists, one obvious loop per rule. The parity tests run our recipes
and online objectives against these on random inputs with ties and edge cases.

Where the reference leaves an order open (torch.topk on equal values), these oracles fix it the way our
implementations document it: the earlier row, then the earlier position, comes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's and DuckDB's quantile_cont default)."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * min(max(q, 0.0), 1.0)
    low = math.floor(h)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (h - low) * (ordered[high] - ordered[low])


def python_round(x: float) -> int:
    """The reference code's int(round(x)): Python rounds halves to even."""
    return int(round(x))


# ---- The response span of the LLaMA-Factory forks (EKSFT, Q-Tuning) ---------------------------------------


def slot_span(response: list[bool], end_of_turn: list[bool], message_index: list[int]) -> list[bool]:
    """Their chatml templates label the assistant's whole slot, ``{content}<|im_end|>\n``: the content, the
    end-of-turn token, and what the template writes after it inside the same turn (the newline)."""
    labelled = list(response)
    for t in range(len(response)):
        if end_of_turn[t]:
            u = t + 1
            while u < len(response) and message_index[u] == message_index[t]:
                labelled[u] = True
                u += 1
    return labelled


# ---- Q-Tuning (Q-tuning/Q-tuning @dd6eba5, trainer.py) ----------------------------------------------------


@dataclass
class Sample:
    nll: list[float | None]  # per position t = 0..n-1; None at t = 0 (nothing predicts the first token)
    entropy: list[float | None]  # the entropy of the distribution that predicted token t; None at t = 0
    response: list[bool]  # label (response) positions

    @property
    def n(self) -> int:
        return len(self.nll)


@dataclass
class QTuningResult:
    q2: set[int] = field(default_factory=set)
    q4: set[int] = field(default_factory=set)
    filled: set[int] = field(default_factory=set)
    q2_like: set[int] = field(default_factory=set)
    alpha: float = 0.0
    masks: dict[int, list[bool]] = field(default_factory=dict)  # kept response positions of the pruned rows
    dropped_tokens: int = 0
    normaliser: int = 0  # kept non-pad positions (prompt included) of the kept rows

    @property
    def kept(self) -> set[int]:
        return self.q2 | self.q4 | self.filled


def qtuning(samples: list[Sample], *, r_sample: float, r_token: float, smoothing: float = 0.5,
            entropy_over: str = "all", search: str = "last") -> QTuningResult:
    """One Q-Tuning batch (online: a micro-batch; offline: the whole pool)."""
    size = len(samples)
    ppl, entropy = [], []
    for s in samples:
        losses = [s.nll[t] for t in range(1, s.n) if s.response[t]]
        ppl.append(math.exp(sum(losses) / len(losses)) if losses else 1.0)
        positions = range(1, s.n) if entropy_over == "all" else [t for t in range(1, s.n) if s.response[t]]
        values = [s.entropy[t] for t in positions]
        entropy.append(sum(values) / len(values) if values else 0.0)

    # bisection on alpha = beta in [0, 0.49], at most 10 iterations, tolerance 0.01
    low, high = 0.0, 0.49
    iterates = []
    for _ in range(10):
        alpha = (low + high) / 2
        p_hi, p_lo = quantile(ppl, 1 - alpha), quantile(ppl, alpha)
        h_lo, h_hi = quantile(entropy, alpha), quantile(entropy, 1 - alpha)
        q2 = {i for i in range(size) if ppl[i] > p_hi and entropy[i] <= h_lo}
        q4 = {i for i in range(size) if ppl[i] <= p_lo and entropy[i] > h_hi}
        keep = (len(q2) + len(q4)) / size
        iterates.append((alpha, q2, q4, keep))
        if abs(keep - r_sample) < 0.01:
            break
        if keep < r_sample:
            low = alpha
        else:
            high = alpha
    if search == "last":
        alpha, q2, q4, _ = iterates[-1]
    else:  # best-under: the iterate keeping the most without going over r_sample (the first of equals)
        under = [it for it in iterates if it[3] <= r_sample] or [min(iterates, key=lambda it: it[3])]
        alpha, q2, q4, _ = max(under, key=lambda it: it[3])
    result = QTuningResult(q2=set(q2), q4=set(q4), alpha=alpha)

    # fill-up to K = max(1, round(B r_sample)) by |ppl_n - H_n| (min-max normalised), Q2-like when s2 >= s4
    want = min(max(1, python_round(size * r_sample)), size)
    if len(result.kept) < want:
        def normalised(xs: list[float]) -> list[float]:
            lo, hi = min(xs), max(xs)
            return [0.0] * len(xs) if hi - lo < 1e-12 else [(x - lo) / (hi - lo) for x in xs]

        pn, hn = normalised(ppl), normalised(entropy)
        rest = sorted((i for i in range(size) if i not in result.kept), key=lambda i: (-max(pn[i] - hn[i], hn[i] - pn[i]), i))
        for i in rest[: want - len(result.kept)]:
            result.filled.add(i)
            if pn[i] - hn[i] >= hn[i] - pn[i]:
                result.q2_like.add(i)

    # the token budget: round(T r_sample r_token) of all T non-pad positions; dropped samples count as removed
    total = sum(s.n - 1 for s in samples)
    target = python_round(total * r_sample * r_token)
    removed = sum(samples[i].n - 1 for i in range(size) if i not in result.kept)
    remaining = max(0, (total - target) - removed)
    if r_token == 1.0:
        remaining = 0  # trainer.py:683 prunes tokens only when token_ratio != 1.0

    def ppl_at(s: Sample, t: int) -> float:
        if t < 1 or t >= s.n:
            return 0.0  # before the start, past the end
        return math.exp(s.nll[t]) if s.response[t] else 1.0  # a prompt position has ppl 1

    candidates = []
    for i in sorted(result.q2 | result.q2_like):
        s = samples[i]
        for t in range(1, s.n):
            if s.response[t]:
                score = (1 - smoothing) * ppl_at(s, t) + smoothing * (ppl_at(s, t - 1) + ppl_at(s, t + 1))
                candidates.append((-score, i, t))
    dropped = {(i, t) for _, i, t in sorted(candidates)[: min(remaining, len(candidates))]}
    result.dropped_tokens = len(dropped)
    for i in sorted(result.q2 | result.q2_like):
        s = samples[i]
        result.masks[i] = [s.response[t] and t >= 1 and (i, t) not in dropped for t in range(s.n)]
    result.normaliser = sum(samples[i].n - 1 for i in result.kept) - len(dropped)
    return result


# ---- EKSFT (MINE-USTC/EKSFT @0908ab2) ---------------------------------------------------------------------


def eksft_mask(entropy: list[float | None], kl: list[float | None], response: list[bool], *, ratio: float = 0.2,
               combine: str = "union", end_of_turn: list[bool] | None = None) -> list[bool]:
    """The tokens of one sequence that train (True), after masking the top-k by entropy and by KL,
    k = floor(ratio x response tokens); ``end_of_turn`` given: those tokens are never masked."""
    positions = [t for t in range(1, len(response)) if response[t]]
    k = math.floor(ratio * len(positions))
    candidates = [t for t in positions if not (end_of_turn and end_of_turn[t])]
    by_entropy = set(sorted(candidates, key=lambda t: (-entropy[t], t))[:k])
    by_kl = set(sorted(candidates, key=lambda t: (-kl[t], t))[:k])
    masked = by_entropy | by_kl if combine == "union" else by_entropy & by_kl
    return [t in positions and t not in masked for t in range(len(response))]


# ---- InstructDiff (zhuchichi56/Instruct-diff @28adfe3) ----------------------------------------------------


@dataclass
class Scored:
    example_id: str
    nll_base: float
    nll_calibrated: float
    entropy_base: float
    entropy_calibrated: float
    response_tokens: int


def instructdiff(rows: list[Scored], *, trim: float = 0.1, share: float = 0.1, budget: str = "tokens") -> list[str]:
    """Trim int(trim N) at each end by diff_nll = NLL_base - NLL_calibrated (none when that would leave nothing),
    then add examples by ascending diff_entropy = H_base - H_calibrated until the budget: int(share x all
    response tokens, counted before trimming), the example that crosses it included (at least one); or, the
    paper's text, max(1, int(share x the trimmed count)) examples."""
    cut = int(trim * len(rows))
    ordered = sorted(rows, key=lambda r: (r.nll_base - r.nll_calibrated, r.example_id))
    kept = ordered if cut * 2 >= len(ordered) else ordered[cut : len(ordered) - cut]
    ranked = sorted(kept, key=lambda r: (r.entropy_base - r.entropy_calibrated, r.example_id))
    if not ranked:
        return []
    if budget == "samples":
        return sorted(r.example_id for r in ranked[: max(1, int(share * len(ranked)))])
    limit = int(share * sum(r.response_tokens for r in rows))
    chosen, spent = [], 0
    for row in ranked:
        chosen.append(row.example_id)
        spent += row.response_tokens
        if spent >= limit:
            break
    return sorted(chosen)


# ---- Complexity-aware fine-tuning (LabARSS/complexity-aware-fine-tuning @802051c) --------------------------


def complexity_buckets(entropy: dict[str, float], *, low: float = 0.25, high: float = 0.75) -> dict[str, str]:
    """H / max(H) over the data, cut at the low and high quantiles: easy < q_low <= middle < q_high <= hard."""
    top = max(entropy.values())
    normalised = {k: v / top if top > 0 else 0.0 for k, v in entropy.items()}
    q_low, q_high = quantile(list(normalised.values()), low), quantile(list(normalised.values()), high)
    return {k: "easy" if x < q_low else "hard" if x >= q_high else "middle" for k, x in normalised.items()}


@dataclass
class TeacherReply:
    text: str | None  # the teacher's response (None or "": it gave none)
    answer: str | None  # the answer parsed from it ([[n]]), if any
    truncated: bool = False  # cut off by the token limit
    correct: bool | None = None


# Qwen_train_test_cot.py:32-38 and :149-159: cot_sys_prompt() is called without a subject
STAGE2_SYSTEM = ("The following are multiple choice questions. Explain your thinking process step-by-step. At the end, "
                 "write the correct answer number using [[number]] format.")
STAGE2_INSTRUCTION = "Please analyze step by step and provide the answer."


def complexity_stage2_prompt(question: str, choices: list[str] | None) -> list[dict[str, str]]:
    """The training script's own prompt for a hard row: its system prompt without the subject, the question, the
    options numbered from 1 (none for a question without options), then its instruction."""
    options = "".join(f"\n{i}. {c.strip()}" for i, c in enumerate(choices or [], start=1))
    user = f"Question: {question.strip()}" + (f"\nOptions:{options}" if choices else "") + f"\n{STAGE2_INSTRUCTION}"
    return [{"role": "system", "content": STAGE2_SYSTEM}, {"role": "user", "content": user}]


def complexity_rows(buckets: dict[str, str], gold: dict[str, str | None], teacher: dict[str, TeacherReply], *,
                    answer_source: str = "distill", require_parsed: bool = False,
                    require_correct: bool = False) -> dict[str, tuple[int, str]]:
    """The two stages' training rows, id -> (stage, reply). Stage 1, easy and middle: ``[[distill_answer]]``, the
    teacher's parsed answer, keeping only rows that have one (Qwen_train_test_sft.py:184, :204; answer_source =
    gold: the reference answer). Stage 2, hard: the teacher's response, every hard row that has one, parsed or
    not (Qwen_train_test_cot.py:181); ours also leaves out a response cut off by the token limit (documented)."""
    rows: dict[str, tuple[int, str]] = {}
    for name, bucket in buckets.items():
        reply = teacher.get(name)
        if bucket != "hard":
            answer = (reply.answer if reply else None) if answer_source == "distill" else gold.get(name)
            if answer is not None:
                rows[name] = (1, f"[[{answer}]]")
            continue
        if reply is None or not reply.text or reply.truncated:
            continue
        if (require_parsed and reply.answer is None) or (require_correct and not reply.correct):
            continue
        rows[name] = (2, reply.text)
    return rows
