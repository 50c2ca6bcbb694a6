"""Teacher traces: best-of-n ranking on given rows, and real SmolLM2 generation through vLLM on GSM8K with
kill-and-resume."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from curate.store import schema
from curate.stages.best_of_n import choose_best
from curate.models.teacher import Sampling
from curate.stages.generate import generate, source_predicate
from curate.store.sql import connect
from curate.store.workspace import Workspace

SUBSET = "example_id < '01'"  # 8 GSM8K problems


def _trace(example: str, index: int, correct: bool | None, tokens: int, truncated: bool = False) -> dict:
    return {"trace_id": f"{example}-{index}", "example_id": example, "gen_key": "g", "sample_index": index,
            "text": f"trace {index}", "is_correct": correct, "truncated": truncated, "n_completion_tokens": tokens}


def test_best_of_n_prefers_correct_then_complete_then_shortest(workspace: Workspace) -> None:
    rows = [
        _trace("a", 0, False, 10), _trace("a", 1, True, 90), _trace("a", 2, True, 40),  # correct beats short
        _trace("b", 0, None, 50), _trace("b", 1, False, 5),  # unchecked beats wrong
        _trace("c", 0, False, 30, truncated=True), _trace("c", 1, False, 60),  # complete beats cut off
        _trace("d", 0, True, 20), _trace("d", 1, True, 20),  # tie: lowest sample index
    ]
    full = [{name: row.get(name) for name in schema.TRACES.names} for row in rows]
    workspace.write_part("traces", pa.Table.from_pylist(full, schema=schema.TRACES), schema=schema.TRACES)
    assert choose_best(workspace, "g", rule="shortest") == 4
    chosen = connect(workspace).execute(
        "select example_id, trace_id, n_candidates, n_correct from best_traces order by example_id").fetchall()
    assert chosen == [("a", "a-2", 3, 2), ("b", "b-0", 2, 0), ("c", "c-1", 2, 0), ("d", "d-0", 2, 2)]
    with pytest.raises(ValueError, match="needs a student"):
        choose_best(workspace, "g", rule="student-logprob")


def test_from_names_a_selection_a_predicate_or_a_query(workspace: Workspace) -> None:
    from test_recipes import examples

    examples(workspace, ["a", "b", "c"])
    assert source_predicate(workspace, "split = 'pool'") == "(split = 'pool')"
    workspace.write_part("selections/hard", pa.table({"example_id": ["x"]}), schema=pa.schema([("example_id", pa.string())]))
    assert "selections_hard" in source_predicate(workspace, "hard")
    query = source_predicate(workspace, "select example_id from examples order by example_id limit 2;")
    assert connect(workspace).execute(f"select example_id from examples where {query} order by 1").fetchall() == [("a",), ("b",)]
    with pytest.raises(ValueError, match=r"--from 'selec example_id' is not usable SQL.*whole query that returns example_id"):
        source_predicate(workspace, "selec example_id")


@pytest.mark.model
def test_real_generation_is_well_formed_and_resumes(fresh: Workspace, teacher, reference, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sampling = Sampling(n=2, temperature=0.8, max_tokens=24)  # short: what is checked is the rows, not the prose
    real_write = Workspace.write_part
    calls = {"n": 0}

    def dies_on_second_batch(self, name, table, *, schema):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed: the first batch is on disk, the rest is lost
        return real_write(self, name, table, schema=schema)

    monkeypatch.setattr(Workspace, "write_part", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate(fresh, teacher, source=SUBSET, sampling=sampling, batch_size=4, progress=False)
    monkeypatch.setattr(Workspace, "write_part", real_write)
    problems = connect(fresh).execute(f"select count(*) from examples where {SUBSET}").fetchall()[0][0]
    requests = 2 * problems
    resumed = generate(fresh, teacher, source=SUBSET, sampling=sampling, batch_size=4, progress=False)
    assert resumed.already_done == 4 and resumed.requests_sent == requests - 4  # one part: 2 examples x 2 samples
    again = generate(fresh, teacher, source=SUBSET, sampling=sampling, batch_size=4, progress=False)
    assert again.requests_sent == 0 and again.already_done == requests

    con = connect(fresh)
    rows = con.sql("select * from traces order by example_id, sample_index").pl().to_dicts()
    assert len(rows) == requests and len({r["trace_id"] for r in rows}) == requests  # 2 samples each, no duplicates
    for row in rows:
        assert row["finish_reason"] in ("stop", "length") and row["truncated"] == (row["finish_reason"] == "length")
        assert 0 < row["n_completion_tokens"] <= sampling.max_tokens and row["n_prompt_tokens"] > 20
        assert row["prompt"][-1]["role"] == "user" and "####" in row["prompt"][-1]["content"]
        assert row["is_correct"] == (row["extracted_answer"] == row["reference_answer"])
        assert row["teacher_hash"] and row["template"] == "numeric" and row["temperature"] == 0.8
    assert len({r["seed"] for r in rows}) == requests  # every request has its own seed

    uninterrupted = Workspace(tmp_path / "straight")
    con.execute(f"copy (select * from examples) to '{tmp_path / 'ex.parquet'}'")
    uninterrupted.table_dir("examples").mkdir(parents=True)
    (tmp_path / "ex.parquet").rename(uninterrupted.table_dir("examples") / "part-0.parquet")
    generate(uninterrupted, teacher, source=SUBSET, sampling=sampling, batch_size=8, progress=False)
    straight = connect(uninterrupted).execute("select trace_id from traces order by trace_id").fetchall()
    assert straight == con.execute("select trace_id from traces order by trace_id").fetchall()

    # best-of-n under the student: among equally correct traces, the highest mean log-prob wins
    gen_key = rows[0]["gen_key"]
    assert choose_best(fresh, gen_key, rule="student-logprob", student=reference) == problems
    best = connect(fresh).sql("select * from best_traces where rule = 'student-logprob'").pl().to_dicts()
    for choice in best:
        assert choice["student_mean_logprob"] < 0 and choice["student_key"] == reference.key
        siblings = [r for r in rows if r["example_id"] == choice["example_id"]]
        assert choice["is_correct"] == any(r["is_correct"] for r in siblings)


@pytest.mark.model
def test_greedy_traces_match_transformers_generate(fresh: Workspace, teacher, smollm2_dir: Path) -> None:
    """The teacher runs without chunked prefill (see curate.models.teacher.open_teacher): its greedy continuations
    are the ones transformers' own generate produces from the same prompt tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    generate(fresh, teacher, source=SUBSET, sampling=Sampling(max_tokens=16), progress=False)
    rows = connect(fresh).sql("select prompt, text from traces").pl().to_dicts()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = teacher.tokenizer
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert row["text"].strip()[:30] == expected.strip()[:30]
