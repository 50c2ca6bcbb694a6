"""The methods' reference settings end to end on a tiny model: InstructDiff's iterations and its plain-text
scoring format, the complexity-aware probe's multiple-choice prompt, and the GPQA source it is meant for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from curate.stages.ingest import ingest
from curate.kernel.chat_tokens import tokenize_alpaca
from curate.models.scorer import open_scorer
from curate.stages.score import score
from curate.store.sql import connect
from curate.store.workspace import Workspace

CHATS = [{"prompt": f"What is {i} times 3?", "completion": f"{i} times 3 is {3 * i}.\n#### {3 * i}"} for i in range(1, 41)]


def test_alpaca_format_scores_everything_after_the_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = tokenize_alpaca(tokenizer, [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}])
    text = tokenizer.decode(tokens.token_ids)
    assert text.startswith("Below is an instruction") and "### Instruction:\nAdd 2 and 3.\n\n### Response:\n5" in text
    assert tokenizer.decode([t for t, r in zip(tokens.token_ids, tokens.is_response) if r]) == "\n5"  # no EOS, newline included
    assert not any(tokens.is_end_of_turn)
    ws = Workspace(tmp_path / "ws")
    ingest([str(write_jsonl(tmp_path / "c.jsonl", CHATS[:6]))], workspace=ws, progress=False)
    bare = tmp_path / "no-template"  # a base model without a chat template can be scored in this format
    bare.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.name != "chat_template.jinja":
            (bare / file.name).write_bytes(file.read_bytes())
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    chat_scorer = open_scorer(str(tiny_model_dir), engine="transformers", dtype="float32", top_k=1)
    alpaca = open_scorer(str(bare), engine="transformers", dtype="float32", top_k=1, prompt_format="alpaca")
    assert alpaca.tokenizer.chat_template is None and alpaca.key != chat_scorer.key
    assert score(ws, alpaca, progress=False).examples_scored == 6
    counts = connect(ws).execute("select n_content_tokens = n_response_tokens, mean_nll_content = mean_nll from sample_scores").fetchall()
    assert counts and all(a and b for a, b in counts)  # no end-of-turn token in the plain format
    with pytest.raises(ValueError, match="--ifd scores the reply alone in the chat template"):
        score(ws, alpaca, ifd=True, progress=False)


def test_instructdiff_iterations_train_each_calibrator_from_the_base_and_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    from curate.experiments.instructdiff import iterate

    ws = Workspace(tmp_path / "ws")
    ingest([str(write_jsonl(tmp_path / "c.jsonl", CHATS))], workspace=ws, progress=False)
    training = {"lora_r": 0, "max_steps": 2, "batch_size": 4, "max_len": 64, "precision": "float32"}
    first = iterate(ws, model=str(tiny_model_dir), iterations=2, warmup_fraction=0.25, training=training, engine="transformers",
                    dtype="float32", params={"share": "0.3"}, progress=False)
    assert [it.trained for it in first.iterations] == [True, True] and all(it.selected > 0 for it in first.iterations)
    second_config = json.loads((ws.root / "models" / "instructdiff" / "calibrated_2" / "train_config.json").read_text())["config"]
    assert second_config["model"] == str(tiny_model_dir) and second_config["data"].endswith("selections/instructdiff_1")
    assert second_config["lora_r"] == 0  # full fine-tuning, as the reference
    first_config = json.loads((ws.root / "models" / "instructdiff" / "calibrated_1" / "train_config.json").read_text())["config"]
    assert first_config["fraction"] == 0.25 and first_config["seed"] == 42
    again = iterate(ws, model=str(tiny_model_dir), iterations=2, warmup_fraction=0.25, training=training, engine="transformers",
                    dtype="float32", params={"share": "0.3"}, progress=False)
    assert [it.trained for it in again.iterations] == [False, False] and [it.scored for it in again.iterations] == [0, 0]
    assert [it.selected for it in again.iterations] == [it.selected for it in first.iterations]


def test_the_reference_multiple_choice_probe_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    from curate.stages.probe import probe
    from curate.stages.prompts import load_template

    template = load_template("options", purpose="answer_only")
    asked = template.apply([{"role": "user", "content": "Which is heavier?"}, {"role": "assistant", "content": "B"}],
                           {"choices": ["a feather", "a brick"], "subject": "physics"})
    assert asked[0] == {"role": "system", "content": "The following are multiple choice questions about physics. If you are "
                        "certain about the answer return the correct option number, otherwise return 0. Write down ONLY the NUMBER and nothing else."}
    assert asked[1]["content"].startswith("Question: Which is heavier?\nOptions:\n1. a feather\n2. a brick\nChoose one of the answers.")
    without = template.apply([{"role": "user", "content": "Q"}], {"choices": ["x", "y"]})
    assert without[0]["content"].startswith("The following are multiple choice questions. If you")
    rows = [{"prompt": f"Question {i}?", "completion": "Answer: B", "answer": "B", "choices": ["no", "yes", "maybe"],
             "subject": "logic", "category": "math" if i % 2 else "philosophy"} for i in range(12)]
    ws = Workspace(tmp_path / "ws")
    ingest([str(write_jsonl(tmp_path / "mc.jsonl", rows))], workspace=ws, answer_field="answer", progress=False)
    scorer = open_scorer(str(tiny_model_dir), engine="transformers", dtype="float32", top_k=0)
    report = probe(ws, scorer, progress=False)
    table = connect(ws).sql("select * from probe_scores").pl().to_dicts()
    assert report.probed == 12 and {r["template"] for r in table} == {"options"}
    assert {r["reference_answer"] for r in table} == {"2"}  # B is option 2
    assert {r["category"] for r in table} == {"math", "philosophy"}
    for r in table:  # valid: an option number 1..3; "0" is "not sure", left out like an invalid answer
        text = r["token_text"].strip()
        assert r["is_valid"] == (text in ("1", "2", "3")) and r["not_sure"] == (text == "0")
    assert set(report.auc_by_category) <= {"math", "philosophy"}


def test_the_gpqa_source_keeps_choices_subject_and_category(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    report = ingest(["gpqa"], workspace=ws, progress=False)
    assert report.added == 198 and not report.rejected
    rows = connect(ws).execute("select reference_answer, messages, meta from examples").fetchall()
    letters = {answer for answer, _, _ in rows}
    assert letters == {"A", "B", "C", "D"}  # the correct option is not always first
    for answer, messages, meta in rows[:20]:
        fields = json.loads(meta)["fields"]
        assert len(fields["choices"]) == 4 and fields["category"] in ("Physics", "Chemistry", "Biology") and fields["subject"]
        question = messages[0]["content"]
        assert all(f"{letter}) {choice}" in question for letter, choice in zip("ABCD", fields["choices"]))
        assert messages[-1]["content"].endswith(f"Answer: {answer}")

