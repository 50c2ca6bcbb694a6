"""The answer-entropy probe: templates, the ROC AUC, and real SmolLM2 probes on GSM8K (numeric) and on
multiple-choice questions, checked against the model's own forward pass."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import SUBSET, write_jsonl
from curate.stages.ingest import ingest
from curate.stages.probe import probe, roc_auc
from curate.stages.prompts import load_template
from curate.store.sql import connect
from curate.store.workspace import Workspace


def _pairwise_auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 60).astype(float).tolist()  # many ties
    labels = (rng.random(60) < 0.4).tolist()
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))
    assert roc_auc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert roc_auc([0.9, 0.2], [False, True]) == 0.0
    assert roc_auc([0.3, 0.4], [True, True]) is None


def test_templates_wrap_the_last_user_turn_and_refuse_bad_files(tmp_path: Path) -> None:
    template = load_template("numeric", purpose="answer_only")
    asked = template.apply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4"}])
    assert [m["role"] for m in asked] == ["system", "user"]
    assert asked[-1]["content"].startswith("2+2?") and "ONLY" in asked[-1]["content"]
    with pytest.raises(ValueError, match="no user turn"):
        template.apply([{"role": "assistant", "content": "4"}])
    own = tmp_path / "mine.txt"
    own.write_text("Q: {question}\n[assistant]\nA:")
    mine = load_template(str(own), purpose="answer_only")
    assert mine.apply([{"role": "user", "content": "x"}])[0]["content"] == "Q: x" and mine.prefill == "A:"
    own.write_text("no placeholder")
    with pytest.raises(ValueError, match="placeholder"):
        load_template(str(own), purpose="answer_only")
    with pytest.raises(FileNotFoundError, match="numeric, choice"):
        load_template("nope", purpose="answer_only")


@pytest.mark.model
def test_probe_on_gsm8k_matches_the_model_and_resumes(fresh: Workspace, reference, smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    report = probe(fresh, reference, where=SUBSET, progress=False)
    rows = connect(fresh).sql("select * from probe_scores order by example_id").pl().to_dicts()
    assert report.probed == len(rows) == report.rows >= 10
    log_vocab = math.log(reference.head.vocab_size)
    for row in rows:
        assert row["template"] == "numeric" and 0 <= row["entropy"] <= log_vocab
        assert row["entropy_norm"] == pytest.approx(row["entropy"] / log_vocab)
        # the reference's first token as the model would write it: GSM8K answers start with a digit
        assert reference.tokenizer.decode([row["expected_token_id"]]).strip() == row["reference_answer"][0]
        assert row["is_correct"] == (row["is_valid"] and row["token_id"] == row["expected_token_id"])
    # against the model's own forward pass: greedy token and entropy at the last prompt position
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    template = load_template("numeric", purpose="answer_only")
    example = connect(fresh).execute(f"select messages from examples where example_id = '{rows[0]['example_id']}'").fetchall()[0][0]
    # the prompt as the model sees it: chat template, then the prefill and the space before a number
    text = reference.tokenizer.apply_chat_template(template.apply(example), add_generation_prompt=True, tokenize=False)
    assert template.prefill == "The final answer is"
    ids = reference.tokenizer(text + template.prefill + " ", add_special_tokens=False)["input_ids"]
    assert len(ids) == rows[0]["n_prompt_tokens"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    assert int(logp.argmax()) == rows[0]["token_id"]
    assert float(-(logp.exp() * logp).sum()) == pytest.approx(rows[0]["entropy"], abs=1e-4)
    # the reported AUC is the table's, over valid answers
    valid = [r for r in rows if r["is_valid"]]
    expected_auc = roc_auc([1 - r["entropy_norm"] for r in valid], [r["is_correct"] for r in valid])
    assert report.roc_auc == expected_auc and report.valid == len(valid)
    again = probe(fresh, reference, where=SUBSET, progress=False)
    assert again.probed == 0 and again.already_done == len(rows)  # same model and templates: nothing to do


@pytest.mark.model
def test_probe_multiple_choice_and_engines_agree(reference, vllm_scorer, tmp_path: Path) -> None:
    questions = [
        ("Which planet is known as the Red Planet?\n\nA) Venus\nB) Mars\nC) Jupiter\nD) Saturn", "B"),
        ("What is the boiling point of water at sea level?\n\nA) 50 C\nB) 75 C\nC) 100 C\nD) 150 C", "C"),
        ("Which gas do plants absorb from the air?\n\nA) Carbon dioxide\nB) Oxygen\nC) Helium\nD) Neon", "A"),
        ("How many legs does a spider have?\n\nA) Six\nB) Four\nC) Ten\nD) Eight", "D"),
        ("Which is the largest ocean?\n\nA) Atlantic\nB) Indian\nC) Pacific\nD) Arctic", "C"),
    ]
    rows = [{"prompt": q, "completion": f"Answer: {a}", "label": a} for q, a in questions]
    ws = Workspace(tmp_path / "ws")
    ingest([write_jsonl(tmp_path / "mc.jsonl", rows)], workspace=ws, answer_field="label", progress=False)
    unanswered = [{"prompt": "Name a colour.", "completion": "Blue."}]
    ingest([write_jsonl(tmp_path / "open.jsonl", unanswered)], workspace=ws, progress=False)
    by_engine = {}
    for scorer in (reference, vllm_scorer):
        report = probe(ws, scorer, progress=False)
        assert report.probed == 5 and report.skipped["no_reference_answer"] == 1
        by_engine[scorer.engine.name] = connect(ws).sql(
            f"select * from probe_scores where probe_key = '{report.key}' order by example_id").pl().to_dicts()
    for ours, ref in zip(by_engine["vllm"], by_engine["transformers"]):
        assert ours["template"] == "choice"
        assert reference.tokenizer.decode([ours["expected_token_id"]]).strip() == ours["reference_answer"]
        assert ours["token_id"] == ref["token_id"]  # same greedy token through both engines (float32)
        assert ours["entropy"] == pytest.approx(ref["entropy"], abs=2e-3)
