"""Each method against an independent oracle of its reference rule (tests/oracles.py, written from
METHODS.md): our SQL recipe and our online objective give the same rows, masks and kept-token counts on
random inputs with ties and edge cases (one-token responses, all-equal scores, empty buckets)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

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


@dataclass
class Chat:
    """A scored conversation as token_scores holds it: the response as token_scores marks it (content and
    end-of-turn token), the end-of-turn tokens, and which message each token belongs to."""

    nll: list[float | None]
    entropy: list[float | None]
    response: list[bool]
    end_of_turn: list[bool]
    message_index: list[int]

    def sample(self, span: str = "slot") -> oracles.Sample:
        """What the reference trains on: the LLaMA-Factory slot (span = slot) or token_scores' own span."""
        labels = oracles.slot_span(self.response, self.end_of_turn, self.message_index) if span == "slot" else self.response
        return oracles.Sample(self.nll, self.entropy, labels)


def random_chat(rng: random.Random, *, equal: bool = False, turns: int = 1) -> Chat:
    """A prompt, then ``turns`` replies, each: a role header, content, the end-of-turn token and 0-2 tokens the
    template writes after it in the same turn (chatml: the newline); a user turn between replies."""
    response, end, message = [False] * rng.randint(1, 4), [], []
    message = [0] * len(response)
    for turn in range(turns):
        if turn:
            user = rng.randint(1, 3)
            response += [False] * user
            message += [message[-1] + 1] * user
        index = message[-1] + 1
        header, content, tail = rng.randint(0, 2), rng.randint(0, 6), rng.randint(0, 2)
        response += [False] * header + [True] * (content + 1) + [False] * tail
        message += [index] * (header + content + 1 + tail)
        end += [False] * (len(response) - len(end) - tail - 1) + [True] + [False] * tail
    n = len(response)
    nll = [None] + [f32(1.0 if equal else rng.choice(NLL_VALUES)) for _ in range(n - 1)]
    entropy = [None] + [f32(1.0 if equal else rng.choice(ENTROPY_VALUES)) for _ in range(n - 1)]
    return Chat(nll, entropy, response, end, message)


def random_sample(rng: random.Random, *, equal: bool = False) -> oracles.Sample:
    return random_chat(rng, equal=equal).sample("content_eot")


def scored_workspace(ws: Workspace, chats: list[Chat], key: str = "k") -> list[str]:
    """The chats as token_scores rows (+ sample_scores from them, as curate score builds it)."""
    names = [f"e{i:03d}" for i in range(len(chats))]
    examples(ws, names)
    rows = [{"example_id": name, "score_key": key, "variant": "chat", "token_ids": list(range(100, 100 + len(c.nll))),
             "n_tokens": len(c.nll), "message_index": c.message_index, "is_response": c.response, "is_end_of_turn": c.end_of_turn,
             "logprob": [None] + [-v for v in c.nll[1:]], "entropy": c.entropy} for name, c in zip(names, chats)]
    put(ws, "token_scores", rows)
    rebuild_sample_scores(ws, key)
    return names


# ---- Q-Tuning ---------------------------------------------------------------------------------------------

# r_token = 1.0: the reference prunes no token (trainer.py:683), whatever r_sample
QTUNING_CASES = [
    {}, {"r_sample": 0.5, "r_token": 0.7}, {"r_sample": 0.125, "r_token": 0.5},
    {"entropy_over": "response"}, {"search": "best-under"}, {"r_sample": 1.0, "r_token": 1.0},
    {"r_token": 1.0}, {"r_sample": 0.125, "r_token": 1.0},
]
SPAN_CASES = [{"span": "content_eot"}, {"span": "content_eot", "r_sample": 0.5, "r_token": 0.7}, {"span": "slot", "entropy_over": "response"}]


def _name(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items()) or "defaults"


@pytest.mark.parametrize("case", QTUNING_CASES + SPAN_CASES, ids=_name)
def test_qtuning_offline_recipe_matches_the_reference_rule(case: dict, tmp_path) -> None:
    span = case.get("span", "slot")
    for seed in range(6):
        rng = random.Random(seed)
        chats = [random_chat(rng, equal=seed == 5 and i % 2 == 0, turns=1 + (i % 3 == 2)) for i in range(rng.randint(4, 40))]
        samples = [c.sample(span) for c in chats]
        ws = Workspace(tmp_path / f"ws{seed}")
        names = scored_workspace(ws, chats)
        expected = oracles.qtuning(samples, r_sample=case.get("r_sample", 0.25), r_token=case.get("r_token", 0.5),
                                   entropy_over=case.get("entropy_over", "all"), search=case.get("search", "last"))
        rows = run_recipe(ws, load_recipe("qtuning_offline"), {"score_key": "k", **{k: str(v) for k, v in case.items()}}).to_pylist()
        got = {names.index(r["example_id"]): r for r in rows}
        assert set(got) == expected.kept, (seed, case)
        assert {i for i, r in got.items() if r["bucket"] == "q2"} == expected.q2
        assert {i for i, r in got.items() if r["bucket"] in ("q2_fill", "q4_fill")} == expected.filled
        for i, row in got.items():
            whole = [r and t >= 1 for t, r in enumerate(samples[i].response)]
            mask = expected.masks.get(i, whole if span == "slot" else None)  # under slot every kept row says its span
            assert (row["loss_mask"] is None) == (mask is None), (seed, i)
            if mask is not None:
                assert [bool(m) for m in row["loss_mask"]] == mask, (seed, i)
                assert row["is_response"] == samples[i].response and row["n_response_tokens"] == sum(samples[i].response)


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


@pytest.mark.parametrize("case", QTUNING_CASES, ids=_name)
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


def test_qtuning_prunes_no_token_at_r_token_one() -> None:
    """trainer.py:683 prunes only when token_ratio != 1.0: at 1.0 the Q2 rows keep every response token, though
    the batch budget round(T r_sample) alone would remove most of them (as it does at 0.999)."""
    from train.objectives import TokenStats, qtuning_objective

    rng = random.Random(11)
    samples = [random_sample(rng) for _ in range(32)]
    nll, entropy, targets, lengths = _batch(samples)

    def run(r_token: float):
        return qtuning_objective(TokenStats(nll, entropy, torch.zeros(0)), targets, lengths, torch.ones(32), r_sample=0.25,
                                 r_token=r_token, smoothing=0.5, entropy_over="all", search="last", normalise="reference")

    whole, almost = run(1.0), run(0.999)
    pruned = oracles.qtuning(samples, r_sample=0.25, r_token=1.0).q2
    assert pruned and whole.info["pruned_tokens"] == 0 and almost.info["pruned_tokens"] > 0
    assert all(whole.keep[i].tolist() == (targets[i] & (torch.arange(targets.shape[1]) > 0)).tolist() for i in pruned)


def test_the_slot_span_is_the_llamafactory_assistant_slot(smollm2_tokenizer_dir, workspace: Workspace) -> None:
    """On SmolLM2's chatml template, span = slot trains what the LLaMA-Factory forks' template labels,
    `{content}<|im_end|>\\n` per reply (the newline included); span = content_eot stops at `<|im_end|>`."""
    from transformers import AutoTokenizer

    from curate.kernel.chat_tokens import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    replies = ["The answer is 4.", "Twice that is 8."]
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": "And twice that?"}, {"role": "assistant", "content": replies[1]}]
    chat = tokenize_chat(tokenizer, messages)
    examples(workspace, ["e0"])
    flat = [None] + [f32(1.0)] * (len(chat) - 1)
    put(workspace, "token_scores", [{"example_id": "e0", "score_key": "base", "variant": "chat", "token_ids": chat.token_ids,
                                     "n_tokens": len(chat), "message_index": chat.message_index, "is_response": chat.is_response,
                                     "is_end_of_turn": chat.is_end_of_turn, "logprob": [None] + [-1.0] * (len(chat) - 1), "entropy": flat}])
    put(workspace, "pair_scores", [{"example_id": "e0", "pair_key": "pair", "base_key": "base", "is_response": chat.is_response, "kl": flat}])

    def trained(recipe: str, params: dict[str, str]) -> list[str]:
        (row,) = run_recipe(workspace, load_recipe(recipe), params).to_pylist()
        runs, current = [], []
        for token, keep in zip(chat.token_ids, row["loss_mask"]):
            if keep:
                current.append(token)
            elif current:
                runs, current = runs + [tokenizer.decode(current)], []
        return runs + ([tokenizer.decode(current)] if current else [])

    for recipe, params in (("eksft_offline", {"base_key": "base", "pair_key": "pair", "ratio": "0"}),
                           ("qtuning_offline", {"score_key": "base", "r_sample": "1.0", "r_token": "1.0"})):
        assert trained(recipe, params) == [f"{r}<|im_end|>\n" for r in replies], recipe
    assert trained("eksft_offline", {"base_key": "base", "pair_key": "pair", "ratio": "0", "span": "content_eot"}) == [
        f"{r}<|im_end|>" for r in replies]


# ---- EKSFT ------------------------------------------------------------------------------------------------

EKSFT_CASES = [{}, {"ratio": 0.5}, {"combine": "intersection"}, {"keep_end_of_turn": True}, {"ratio": 0.3, "combine": "intersection"},
               {"span": "content_eot"}, {"span": "content_eot", "ratio": 0.5, "keep_end_of_turn": True}]


def _eksft_rows(rng: random.Random, count: int) -> list[tuple[Chat, list]]:
    """Chats (one or two replies, some with template text after the end-of-turn token) and their KL."""
    rows = []
    for i in range(count):
        equal = i % 7 == 0
        chat = random_chat(rng, equal=equal, turns=1 + (i % 4 == 3))
        kl = [None] + [f32(0.5 if equal else rng.choice([0.0, 0.1, 0.2, 0.4])) for _ in range(len(chat.nll) - 1)]
        rows.append((chat, kl))
    return rows


@pytest.mark.parametrize("case", EKSFT_CASES, ids=_name)
def test_eksft_offline_recipe_matches_the_reference_rule(case: dict, workspace: Workspace) -> None:
    rows = _eksft_rows(random.Random(3), 40)
    names = [f"e{i:03d}" for i in range(len(rows))]
    examples(workspace, names)
    put(workspace, "token_scores", [{"example_id": name, "score_key": "base", "variant": "chat", "token_ids": list(range(len(c.nll))),
                                     "is_response": c.response, "is_end_of_turn": c.end_of_turn, "message_index": c.message_index,
                                     "entropy": c.entropy} for name, (c, _) in zip(names, rows)])
    put(workspace, "pair_scores", [{"example_id": name, "pair_key": "pair", "base_key": "base", "is_response": c.response, "kl": kl}
                                   for name, (c, kl) in zip(names, rows)])
    got = {r["example_id"]: r for r in run_recipe(workspace, load_recipe("eksft_offline"),
                                                  {"base_key": "base", "pair_key": "pair", **{k: str(v) for k, v in case.items()}}).to_pylist()}
    for name, (chat, kl) in zip(names, rows):
        labels = chat.sample(case.get("span", "slot")).response
        expected = oracles.eksft_mask(chat.entropy, kl, labels, ratio=case.get("ratio", 0.2), combine=case.get("combine", "union"),
                                      end_of_turn=chat.end_of_turn if case.get("keep_end_of_turn") else None)
        assert [bool(m) for m in got[name]["loss_mask"]] == expected, (name, case)
        assert got[name]["is_response"] == labels and got[name]["n_response_tokens"] == sum(labels)


@pytest.mark.parametrize("case", [c for c in EKSFT_CASES if "span" not in c], ids=_name)
def test_eksft_online_masks_match_the_reference_rule(case: dict) -> None:
    from train.objectives import eksft_masks

    rows = _eksft_rows(random.Random(5), 24)
    width = max(len(c.nll) for c, _ in rows)
    entropy, kl = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    targets, end = torch.zeros(len(rows), width, dtype=torch.bool), torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (chat, k) in enumerate(rows):
        n = len(chat.nll)
        entropy[i, 1:n], kl[i, 1:n] = torch.tensor(chat.entropy[1:]), torch.tensor(k[1:])
        targets[i, :n], end[i, :n] = torch.tensor(chat.response), torch.tensor(chat.end_of_turn)
    masked, _, _ = eksft_masks(entropy, kl, targets, ratio=case.get("ratio", 0.2), combine=case.get("combine", "union"),
                               protected=end if case.get("keep_end_of_turn") else None)
    keep = targets & ~masked
    for i, (chat, k) in enumerate(rows):
        expected = oracles.eksft_mask(chat.entropy, k, chat.response, ratio=case.get("ratio", 0.2), combine=case.get("combine", "union"),
                                      end_of_turn=chat.end_of_turn if case.get("keep_end_of_turn") else None)
        assert keep[i, : len(chat.nll)].tolist() == expected, (i, case)


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


COMPLEXITY_CASES = [{}, {"answer_source": "gold"}, {"require_parsed": True}, {"require_correct": True}, {"stage2_prompt": "teacher"},
                    {"answer_source": "gold", "require_parsed": True, "stage2_prompt": "teacher"}]


def _complexity_workspace(workspace: Workspace) -> tuple[list[str], dict, dict[str, oracles.TeacherReply], dict]:
    """30 probed examples (ties at the cut points, one invalid), some multiple-choice; a teacher reply for most:
    some without a parsed answer, one empty, one cut off, some wrong (answer "1" where the gold is "ans-..")."""
    rng = random.Random(11)
    names = [f"e{i:02d}" for i in range(30)]
    choices = {n: ["alpha ", "beta", " gamma"] for n in names[::3]}
    put(workspace, "examples", [{"example_id": n, "source": "t", "split": "pool", "reference_answer": f"ans-{n}",
                                 "meta": json.dumps({"fields": {"choices": choices[n], "subject": "logic"}} if n in choices else {}),
                                 "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f" q {n}\n"},
                                              {"role": "assistant", "content": f"a {n}"}]} for n in names])
    entropy = {n: rng.choice([0.2, 0.4, 0.4, 0.9, 1.3, 2.0]) for n in names}
    valid = {n: n != "e07" for n in names}
    put(workspace, "probe_scores", [{"example_id": n, "probe_key": "p", "entropy": entropy[n], "entropy_norm": entropy[n] / 10.8,
                                     "is_valid": valid[n]} for n in names])
    teacher = {}
    for i, n in enumerate(names):
        if i % 11 == 10:
            continue  # the teacher gave no response
        answer = None if i % 4 == 3 else f"ans-{n}" if i % 3 else "1"
        teacher[n] = oracles.TeacherReply("" if i == 13 else f"steps for {n} [[{answer}]]", answer, truncated=i == 9,
                                          correct=answer == f"ans-{n}")
    traces = [{"trace_id": f"t{n}", "example_id": n, "gen_key": "g", "prompt": [{"role": "user", "content": f"think about {n}"}],
               "extracted_answer": r.answer, "is_correct": r.correct, "truncated": r.truncated} for n, r in teacher.items()]
    put(workspace, "traces", traces)
    put(workspace, "best_traces", [{"example_id": n, "gen_key": "g", "rule": "shortest", "trace_id": f"t{n}", "text": r.text,
                                    "is_correct": r.correct, "truncated": r.truncated} for n, r in teacher.items()])
    buckets = oracles.complexity_buckets({n: entropy[n] for n in names if valid[n]})
    return names, buckets, teacher, choices


@pytest.mark.parametrize("case", COMPLEXITY_CASES, ids=_name)
def test_complexity_split_rows_match_the_reference_scripts(case: dict, workspace: Workspace) -> None:
    """The split, then the rows the reference's training scripts build: stage 1 the teacher's parsed answer
    (rows without one dropped), stage 2 every hard row with a teacher response under the script's own prompt."""
    names, buckets, teacher, choices = _complexity_workspace(workspace)
    params = {"probe_key": "p", "gen_key": "g", **{k: str(v).lower() for k, v in case.items()}}
    rows = {r["example_id"]: r for r in run_recipe(workspace, load_recipe("complexity_split"), params).to_pylist()}
    expected = oracles.complexity_rows(buckets, {n: f"ans-{n}" for n in names}, teacher, answer_source=case.get("answer_source", "distill"),
                                       require_parsed=case.get("require_parsed", False), require_correct=case.get("require_correct", False))
    assert {n: (r["stage"], r["assistant_text"]) for n, r in rows.items()} == expected
    assert {n: r["bucket"] for n, r in rows.items()} == {n: buckets[n] for n in rows}
    assert {buckets[n] for n, (stage, _) in expected.items() if stage == 2} == {"hard"} and len(expected) > 10
    for name, row in rows.items():
        if row["stage"] == 1:  # the question with the answer-only instruction
            assert row["prompt"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": f" q {name}\n\n\nAnswer with only one number in [[number]]."}]
        elif case.get("stage2_prompt") == "teacher":
            assert row["prompt"] == [{"role": "user", "content": f"think about {name}"}]
        else:  # the training script's prompt (Qwen_train_test_cot.py:149-159)
            assert row["prompt"] == oracles.complexity_stage2_prompt(f" q {name}\n", choices.get(name))


def test_complexity_split_stage_two_prompt_and_plans(workspace: Workspace) -> None:
    names, buckets, teacher, choices = _complexity_workspace(workspace)
    table = run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g"}).to_pylist()
    with_options = next(r for r in table if r["stage"] == 2 and r["example_id"] in choices)
    assert with_options["prompt"][1]["content"] == (f"Question: q {with_options['example_id']}\nOptions:\n1. alpha\n2. beta\n3. gamma\n"
                                                    "Please analyze step by step and provide the answer.")
    assert with_options["prompt"][0]["content"].startswith("The following are multiple choice questions. Explain")
    plans = {plan: run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g", "plan": plan}).to_pylist()
             for plan in ("answer_only", "distill", "alternative")}
    answered = {n for n, r in teacher.items() if r.answer is not None and n in buckets}
    assert {r["example_id"] for r in plans["answer_only"]} == answered and {r["stage"] for r in plans["answer_only"]} == {1}
    traced = {n for n, r in teacher.items() if r.text and not r.truncated and n in buckets}
    assert {r["example_id"] for r in plans["distill"]} == traced and {r["stage"] for r in plans["distill"]} == {1}
    assert all((r["stage"] == 2) == (r["bucket"] == "hard") for r in plans["alternative"])
    assert all(r["assistant_text"].startswith("[[") == (r["bucket"] == "hard") for r in plans["alternative"])
