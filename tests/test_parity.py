"""Each method against an independent oracle of its reference rule (tests/oracles.py, written from
METHODS.md): our SQL recipe and our online objective give the same rows, masks and kept-token counts on
random inputs with ties and edge cases (one-token responses, all-equal scores, empty buckets)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import oracles
from curate.stages.recipes import load_recipe
from curate.store.score_tables import rebuild_sample_scores
from curate.stages.select import run_recipe
from curate.store.workspace import Workspace
from test_recipes import examples, put

NLL_VALUES = [0.0, 0.5, 1.0, 2.0]  # few distinct values: ties on purpose (exp(0) = 1 ties a prompt position)
ENTROPY_VALUES = [0.25, 0.5, 1.0, 2.0]


def f32(value: float) -> float:
    """token_scores hold float32: the oracle sees the same numbers."""
    return float(np.float32(value))


def random_sample(rng: random.Random, *, equal: bool = False) -> oracles.Sample:
    n = rng.randint(2, 16)
    prompt = rng.randint(1, n - 1)  # responses of 1 .. n - 1 tokens
    response = [False] * prompt + [True] * (n - prompt)
    nll = [None] + [f32(1.0 if equal else rng.choice(NLL_VALUES)) for _ in range(n - 1)]
    entropy = [None] + [f32(1.0 if equal else rng.choice(ENTROPY_VALUES)) for _ in range(n - 1)]
    return oracles.Sample(nll, entropy, response)


def scored_workspace(ws: Workspace, samples: list[oracles.Sample], key: str = "k") -> list[str]:
    """The samples as token_scores rows (+ sample_scores from them, as curate score builds it)."""
    names = [f"e{i:03d}" for i in range(len(samples))]
    examples(ws, names)
    rows = [{"example_id": name, "score_key": key, "variant": "chat", "token_ids": list(range(100, 100 + s.n)), "n_tokens": s.n,
             "message_index": [0] * s.n, "is_response": s.response, "is_end_of_turn": [False] * (s.n - 1) + [True],
             "logprob": [None] + [-v for v in s.nll[1:]], "entropy": s.entropy} for name, s in zip(names, samples)]
    put(ws, "token_scores", rows)
    rebuild_sample_scores(ws, key)
    return names


# ---- Q-Tuning ---------------------------------------------------------------------------------------------

QTUNING_CASES = [
    {}, {"r_sample": 0.5, "r_token": 0.7}, {"r_sample": 0.125, "r_token": 0.5},
    {"entropy_over": "response"}, {"search": "best-under"}, {"r_sample": 1.0, "r_token": 1.0},
]


@pytest.mark.parametrize("case", QTUNING_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_qtuning_offline_recipe_matches_the_reference_rule(case: dict, tmp_path) -> None:
    for seed in range(6):
        rng = random.Random(seed)
        samples = [random_sample(rng, equal=seed == 5 and i % 2 == 0) for i in range(rng.randint(4, 40))]
        ws = Workspace(tmp_path / f"ws{seed}")
        names = scored_workspace(ws, samples)
        expected = oracles.qtuning(samples, r_sample=case.get("r_sample", 0.25), r_token=case.get("r_token", 0.5),
                                   entropy_over=case.get("entropy_over", "all"), search=case.get("search", "last"))
        rows = run_recipe(ws, load_recipe("qtuning_offline"), {"score_key": "k", **{k: str(v) for k, v in case.items()}}).to_pylist()
        got = {names.index(r["example_id"]): r for r in rows}
        assert set(got) == expected.kept, (seed, case)
        assert {i for i, r in got.items() if r["bucket"] == "q2"} == expected.q2
        assert {i for i, r in got.items() if r["bucket"] in ("q2_fill", "q4_fill")} == expected.filled
        for i, row in got.items():
            mask = expected.masks.get(i)
            assert (row["loss_mask"] is None) == (mask is None), (seed, i)
            if mask is not None:
                assert [bool(m) for m in row["loss_mask"]] == mask, (seed, i)


def _batch(samples: list[oracles.Sample]) -> tuple[torch.Tensor, ...]:
    width = max(s.n for s in samples)
    nll = torch.zeros(len(samples), width)
    entropy = torch.zeros(len(samples), width)
    targets = torch.zeros(len(samples), width, dtype=torch.bool)
    for row, s in enumerate(samples):
        nll[row, 1 : s.n] = torch.tensor(s.nll[1:])
        entropy[row, 1 : s.n] = torch.tensor(s.entropy[1:])
        targets[row, : s.n] = torch.tensor(s.response)
    return nll, entropy, targets, torch.tensor([s.n for s in samples])


@pytest.mark.parametrize("case", QTUNING_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_qtuning_online_objective_matches_the_reference_rule(case: dict) -> None:
    from train.objectives import TokenStats, qtuning_objective

    for seed in range(20):
        rng = random.Random(100 + seed)
        samples = [random_sample(rng, equal=seed == 19) for _ in range(rng.randint(1, 16))]
        expected = oracles.qtuning(samples, r_sample=case.get("r_sample", 0.25), r_token=case.get("r_token", 0.5),
                                   entropy_over=case.get("entropy_over", "all"), search=case.get("search", "last"))
        nll, entropy, targets, lengths = _batch(samples)
        stats = TokenStats(nll, entropy, torch.zeros(0))
        result = qtuning_objective(stats, targets, lengths, torch.ones(len(samples)), r_sample=case.get("r_sample", 0.25),
                                   r_token=case.get("r_token", 0.5), smoothing=0.5, entropy_over=case.get("entropy_over", "all"),
                                   search=case.get("search", "last"), normalise="reference")
        keep = result.keep.tolist()
        for i, s in enumerate(samples):
            if i not in expected.kept:
                assert not any(keep[i]), (seed, i)
            elif i in expected.masks:
                assert keep[i][: s.n] == expected.masks[i], (seed, i)
            else:
                assert keep[i][: s.n] == [r and t > 0 for t, r in enumerate(s.response)], (seed, i)
        assert result.info["pruned_tokens"] == expected.dropped_tokens
        expected_loss = sum(s.nll[t] for i, s in enumerate(samples) for t in range(s.n) if keep[i][t]) / max(expected.normaliser, 1)
        assert float(result.loss) == pytest.approx(expected_loss, rel=1e-5)  # normalised by kept non-pad positions


def test_qtuning_keeps_the_few_tokens_the_reference_keeps() -> None:
    """The reference budget keeps a small share of Q2 response tokens (METHODS.md: 1-4% at r_token 0.5), where
    the old per-sample rule kept half of them."""
    rng = random.Random(7)
    samples = []
    for _ in range(64):
        n, prompt = rng.randint(60, 200), rng.randint(20, 50)
        response = [False] * prompt + [True] * (n - prompt)
        samples.append(oracles.Sample([None] + [rng.uniform(0, 3) for _ in range(n - 1)],
                                      [None] + [rng.uniform(0, 3) for _ in range(n - 1)], response))
    from train.objectives import TokenStats, qtuning_objective

    nll, entropy, targets, lengths = _batch(samples)
    result = qtuning_objective(TokenStats(nll, entropy, torch.zeros(0)), targets, lengths, torch.ones(64), r_sample=0.25, r_token=0.5,
                               smoothing=0.5, entropy_over="all", search="last", normalise="reference")
    q2 = oracles.qtuning(samples, r_sample=0.25, r_token=0.5).q2
    response_tokens = sum(int(targets[i].sum()) for i in q2)
    kept = sum(int(result.keep[i].sum()) for i in q2)
    assert q2 and kept / response_tokens < 0.1  # the old rule kept ceil(0.5 n) of each Q2 row: 50%


# ---- EKSFT ------------------------------------------------------------------------------------------------

EKSFT_CASES = [{}, {"ratio": 0.5}, {"combine": "intersection"}, {"keep_end_of_turn": True}, {"ratio": 0.3, "combine": "intersection"}]


def _eksft_rows(rng: random.Random, count: int) -> list[tuple[list, list, list, list]]:
    rows = []
    for i in range(count):
        n = rng.randint(2, 30)
        prompt = rng.randint(1, n - 1)
        response = [False] * prompt + [True] * (n - prompt)
        equal = i % 7 == 0
        entropy = [None] + [f32(1.0 if equal else rng.choice(ENTROPY_VALUES)) for _ in range(n - 1)]
        kl = [None] + [f32(0.5 if equal else rng.choice([0.0, 0.1, 0.2, 0.4])) for _ in range(n - 1)]
        end = [False] * (n - 1) + [True]
        rows.append((entropy, kl, response, end))
    return rows


@pytest.mark.parametrize("case", EKSFT_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_eksft_offline_recipe_matches_the_reference_rule(case: dict, workspace: Workspace) -> None:
    rows = _eksft_rows(random.Random(3), 40)
    names = [f"e{i:03d}" for i in range(len(rows))]
    examples(workspace, names)
    put(workspace, "token_scores", [{"example_id": name, "score_key": "base", "variant": "chat", "token_ids": list(range(len(r))),
                                     "is_response": r, "is_end_of_turn": end, "entropy": h} for name, (h, _, r, end) in zip(names, rows)])
    put(workspace, "pair_scores", [{"example_id": name, "pair_key": "pair", "base_key": "base", "is_response": r, "kl": kl}
                                   for name, (_, kl, r, _) in zip(names, rows)])
    got = {r["example_id"]: r for r in run_recipe(workspace, load_recipe("eksft_offline"),
                                                  {"base_key": "base", "pair_key": "pair", **{k: str(v) for k, v in case.items()}}).to_pylist()}
    for name, (h, kl, response, end) in zip(names, rows):
        expected = oracles.eksft_mask(h, kl, response, ratio=case.get("ratio", 0.2), combine=case.get("combine", "union"),
                                      end_of_turn=end if case.get("keep_end_of_turn") else None)
        assert [bool(m) for m in got[name]["loss_mask"]] == expected, (name, case)


@pytest.mark.parametrize("case", EKSFT_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_eksft_online_masks_match_the_reference_rule(case: dict) -> None:
    from train.objectives import eksft_masks

    rows = _eksft_rows(random.Random(5), 24)
    width = max(len(r[2]) for r in rows)
    entropy, kl = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    targets, end = torch.zeros(len(rows), width, dtype=torch.bool), torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (h, k, response, eot) in enumerate(rows):
        n = len(response)
        entropy[i, 1:n], kl[i, 1:n] = torch.tensor(h[1:]), torch.tensor(k[1:])
        targets[i, :n], end[i, :n] = torch.tensor(response), torch.tensor(eot)
    masked, _, _ = eksft_masks(entropy, kl, targets, ratio=case.get("ratio", 0.2), combine=case.get("combine", "union"),
                               protected=end if case.get("keep_end_of_turn") else None)
    keep = targets & ~masked
    for i, (h, k, response, eot) in enumerate(rows):
        expected = oracles.eksft_mask(h, k, response, ratio=case.get("ratio", 0.2), combine=case.get("combine", "union"),
                                      end_of_turn=eot if case.get("keep_end_of_turn") else None)
        assert keep[i, : len(response)].tolist() == expected, (i, case)


def test_eksft_loss_terms_and_sequence_normalisation() -> None:
    """CE per sequence over its kept tokens, minus the entropy bonus and plus the intended KL, each a mean over
    its own masked positions, sequences weighed equally; against the formulas computed by hand."""
    from train.objectives import eksft_objective, token_stats

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, 50, generator=generator, requires_grad=True)
    reference_logits = torch.randn(2, 12, 50, generator=generator)
    ids = torch.randint(0, 50, (2, 12), generator=generator)
    targets = torch.zeros(2, 12, dtype=torch.bool)
    targets[0, 4:], targets[1, 7:] = True, True
    stats = token_stats(logits, ids)
    result = eksft_objective(stats, reference_logits, targets, torch.ones(2), ratio=0.4, combine="union", lambda_entropy=0.05,
                             lambda_kl=0.05, normalise="sequence")
    with torch.no_grad():
        log_p = logits[:, :-1].log_softmax(-1)
        log_q = reference_logits[:, :-1].log_softmax(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    total = 0.0
    for row in range(2):
        positions = targets[row].nonzero()[:, 0].tolist()
        k = math.floor(0.4 * len(positions))
        top_h = sorted(positions, key=lambda t: (-float(entropy[row, t - 1]), t))[:k]
        top_kl = sorted(positions, key=lambda t: (-float(kl[row, t - 1]), t))[:k]
        kept = [t for t in positions if t not in top_h and t not in top_kl]
        ce = sum(float(-log_p[row, t - 1, ids[row, t]]) for t in kept) / len(kept)
        bonus = sum(float(entropy[row, t - 1]) for t in top_h) / len(top_h) / math.log(50)
        penalty = sum(float(kl[row, t - 1]) for t in top_kl) / len(top_kl)
        total += ce - 0.05 * bonus + 0.05 * penalty
    assert result.units == 2 and float(result.loss.detach()) == pytest.approx(total, rel=1e-5)
    result.loss.backward()  # the entropy and KL terms carry gradient
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


# ---- InstructDiff -----------------------------------------------------------------------------------------

INSTRUCTDIFF_CASES = [{}, {"trim": 0.25, "share": 0.3}, {"budget": "samples"}, {"trim": 0.5}, {"share": 0.0}]


@pytest.mark.parametrize("case", INSTRUCTDIFF_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_instructdiff_recipe_matches_the_reference_rule(case: dict, tmp_path) -> None:
    for seed in range(6):
        rng = random.Random(seed)
        count = rng.randint(1, 40)
        rows = [oracles.Scored(f"e{i:03d}", rng.choice([1.0, 1.5, 2.0]), rng.choice([1.0, 1.25, 2.0]), rng.choice([0.5, 1.0]),
                               rng.choice([0.5, 0.75, 1.0]), rng.randint(1, 60)) for i in range(count)]
        ws = Workspace(tmp_path / f"ws{seed}")
        examples(ws, [r.example_id for r in rows])
        for key, side in (("base", "base"), ("cal", "calibrated")):
            put(ws, "sample_scores", [{"example_id": r.example_id, "score_key": key, "mean_nll_content": getattr(r, f"nll_{side}"),
                                       "mean_entropy_content": getattr(r, f"entropy_{side}"), "n_content_tokens": r.response_tokens,
                                       "mean_nll": 9.0, "mean_entropy": 9.0, "n_response_tokens": r.response_tokens + 1} for r in rows])
        got = run_recipe(ws, load_recipe("instructdiff"), {"base_key": "base", "calibrated_key": "cal",
                                                            **{k: str(v) for k, v in case.items()}}).column("example_id").to_pylist()
        assert got == oracles.instructdiff(rows, trim=case.get("trim", 0.1), share=case.get("share", 0.1),
                                           budget=case.get("budget", "tokens")), (seed, case)


# ---- Complexity-aware ------------------------------------------------------------------------------------


def test_complexity_split_buckets_and_stages_match_the_reference_rule(workspace: Workspace) -> None:
    rng = random.Random(11)
    names = [f"e{i:02d}" for i in range(30)]
    examples(workspace, names)
    entropy = {n: rng.choice([0.2, 0.4, 0.4, 0.9, 1.3, 2.0]) for n in names}  # ties at the cut points
    valid = {n: n != "e07" for n in names}
    put(workspace, "probe_scores", [{"example_id": n, "probe_key": "p", "entropy": entropy[n], "entropy_norm": entropy[n] / 10.8,
                                     "is_valid": valid[n]} for n in names])
    traces = [{"trace_id": f"t{n}", "example_id": n, "gen_key": "g", "prompt": [{"role": "user", "content": f"think about {n}"}],
               "extracted_answer": None if n == "e03" else "1", "is_correct": n != "e05", "truncated": n == "e09"} for n in names]
    put(workspace, "traces", traces)
    put(workspace, "best_traces", [{"example_id": t["example_id"], "gen_key": "g", "rule": "shortest", "trace_id": t["trace_id"],
                                    "text": f"steps for {t['example_id']} [[1]]", "is_correct": t["is_correct"], "truncated": t["truncated"]}
                                   for t in traces])
    buckets = oracles.complexity_buckets({n: entropy[n] for n in names if valid[n]})
    rows = {r["example_id"]: r for r in run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g"}).to_pylist()}
    traced = {n for n in names if valid[n] and n not in ("e03", "e09")}  # e03: no parsed answer; e09: cut off
    expected = {n for n, b in buckets.items() if b != "hard" or n in traced}
    assert set(rows) == expected and {n: rows[n]["bucket"] for n in rows} == {n: buckets[n] for n in rows}
    for name, row in rows.items():
        if buckets[name] == "hard":  # stage 2: the teacher's exact prompt and its trace
            assert row["stage"] == 2 and row["prompt"] == [{"role": "user", "content": f"think about {name}"}]
            assert row["assistant_text"] == f"steps for {name} [[1]]"
        else:  # stage 1: the question with the answer-only instruction, the bare answer
            assert row["stage"] == 1 and row["assistant_text"] == f"[[ans-{name}]]"
            assert row["prompt"][-1]["content"] == f"q {name}\n\nAnswer with only one number in [[number]]."
    correct = run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g", "require_correct": "true"})
    assert "e05" not in correct.column("example_id").to_pylist() or buckets["e05"] != "hard"
    plans = {plan: run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g", "plan": plan}).to_pylist()
             for plan in ("answer_only", "distill", "alternative")}
    assert {r["stage"] for r in plans["answer_only"]} == {1} and all(r["assistant_text"].startswith("[[") for r in plans["answer_only"])
    assert {r["example_id"] for r in plans["distill"]} == traced and {r["stage"] for r in plans["distill"]} == {1}
    assert all((r["stage"] == 2) == (r["bucket"] == "hard") for r in plans["alternative"])
    assert all(r["assistant_text"].startswith("[[") == (r["bucket"] == "hard") for r in plans["alternative"])
