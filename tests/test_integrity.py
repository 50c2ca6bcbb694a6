"""Results that used to be silently wrong or doubled (each test fails on the code before the fix), on a tiny
random model with the real SmolLM2 tokenizer and the transformers engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl
from curate.cli import main
from curate.stages.ingest import IngestConflict, ingest
from curate.kernel.chat_tokens import tokenize_chat
from curate.stages.recipes import load_recipe
from curate.models.scorer import open_scorer
from curate.stages.score import score, score_pair
from curate.stages.select import run_recipe, select
from curate.store.sql import connect
from curate.store.workspace import Workspace
from test_recipes import examples, put, token_row

CHATS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}]}
    for i in range(1, 9)
] + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5\n#### 5"}]}]


@pytest.fixture
def chats(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ingest([str(write_jsonl(tmp_path / "chats.jsonl", CHATS))], workspace=ws, answer_style="hash", progress=False)
    return ws


@pytest.fixture(scope="module")
def tiny_scorer(tiny_model_dir: Path):
    scorer = open_scorer(str(tiny_model_dir), engine="transformers", dtype="float32", top_k=2)
    yield scorer
    scorer.close()


def _counts(ws: Workspace, where: str = "") -> list[tuple]:
    return connect(ws).execute(f"select variant, count(*), count(distinct example_id) from token_scores {where} "
                               "group by variant order by variant").fetchall()


def test_ifd_after_a_plain_run_adds_the_response_only_pass(chats: Workspace, tiny_scorer) -> None:
    first = score(chats, tiny_scorer, progress=False)
    assert first.examples_scored == len(CHATS)
    second = score(chats, tiny_scorer, ifd=True, progress=False)  # used to do nothing: IFD stayed null
    assert second.examples_scored == len(CHATS) and second.key == first.key
    assert _counts(chats) == [("chat", 9, 9), ("response_only", 9, 9)]  # the chat rows were not written again
    ifd = connect(chats).execute("select count(ifd) from sample_scores").fetchall()[0][0]
    assert ifd == len(CHATS)
    assert run_recipe(chats, load_recipe("ifd"), {"score_key": first.key, "fraction": "1.0"}).num_rows > 0
    assert score(chats, tiny_scorer, ifd=True, progress=False).examples_scored == 0  # all done: nothing to do


def test_ifd_compares_the_last_reply_with_itself_alone(chats: Workspace, tiny_scorer) -> None:
    score(chats, tiny_scorer, ifd=True, progress=False)
    con = connect(chats)
    rows = con.execute("""
        select c.message_index, c.is_response, c.logprob, r.is_response, r.logprob, s.ifd
        from token_scores c join token_scores r using (example_id) join sample_scores s using (example_id)
        where c.variant = 'chat' and r.variant = 'response_only' and len(c.message_index) > 40
          and list_max(c.message_index) = 3""").fetchall()
    (index, chat_response, chat_logprob, alone_response, alone_logprob, ifd), = rows  # the two-turn example
    last = [lp for i, r, lp in zip(index, chat_response, chat_logprob) if r and i == 3]
    alone = [lp for r, lp in zip(alone_response, alone_logprob) if r]
    assert len(last) == len(alone)  # both passes score the same reply tokens
    assert ifd == pytest.approx((sum(last) / len(last)) / (sum(alone) / len(alone)), rel=1e-5)


def test_a_pair_of_a_model_with_itself_writes_each_row_once(chats: Workspace, tiny_scorer) -> None:
    report = score_pair(chats, tiny_scorer, tiny_scorer, progress=False)
    assert _counts(chats) == [("chat", 9, 9)]  # used to be 18 rows for 9 examples
    assert report.sample_rows == 9 and connect(chats).execute("select count(*) from sample_scores").fetchall() == [(9,)]
    kl = connect(chats).execute("select max(list_max(list_transform(kl[2:], lambda x: abs(x)))) from pair_scores").fetchall()[0][0]
    assert kl < 1e-5


def test_the_reply_alone_is_found_after_the_templates_system_prompt(tiny_model_dir: Path) -> None:
    """SmolLM2's template adds a default system prompt ("... trained by Hugging Face"); scoring a reply alone
    used to find a short reply inside it and mark the system prompt's tokens as the response."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "Face"}]
    alone = tokenize_chat(tokenizer, messages[-1:])
    assert "Hugging Face" in tokenizer.decode(alone.token_ids)
    assert tokenizer.decode([t for t, r in zip(alone.token_ids, alone.is_response) if r]) == "Face<|im_end|>"
    together = tokenize_chat(tokenizer, messages)
    assert sum(together.is_response) == sum(alone.is_response)


def test_an_example_with_no_response_token_is_dropped_and_counted(workspace: Workspace) -> None:
    examples(workspace, ["e1", "e2", "e3"])
    rows, pairs = [], []
    for name, response in (("e1", [False, True, True, True]), ("e2", [False, False, False, False]), ("e3", [False, True, True, True])):
        rows.append(token_row(name, "base", response, entropy=[None, 1.0, 2.0, 3.0]))
        pairs.append({"example_id": name, "pair_key": "pair", "base_key": "base", "is_response": response, "kl": [None, 0.1, 0.2, 0.3]})
    put(workspace, "token_scores", rows)
    put(workspace, "pair_scores", pairs)
    report = select(workspace, load_recipe("eksft_offline"), name="ek", params={"base_key": "base", "pair_key": "pair"})
    assert report.rows == 2 and report.dropped == {"no_response_tokens": 1}  # used to fail the whole selection
    assert "dropped                     1  (no_response_tokens)" in report.summary()


def test_reingesting_with_another_split_or_answer_rule_is_refused(tmp_path: Path, workspace: Workspace) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", CHATS)
    ingest([str(path)], workspace=workspace, heldout_fraction=0.25, progress=False)
    parts = workspace.parts("examples")
    with pytest.raises(IngestConflict, match="with another split or reference answer.*--heldout-fraction"):
        ingest([str(path)], workspace=workspace, heldout_fraction=0.5, progress=False)
    with pytest.raises(IngestConflict, match=r"reference answer None in the workspace, 'heldout' and '2' with these options"):
        ingest([str(path)], workspace=workspace, heldout_fraction=0.25, answer_style="hash", progress=False)
    assert workspace.parts("examples") == parts  # nothing written
    assert ingest([str(path)], workspace=workspace, heldout_fraction=0.25, progress=False).already_present == len(CHATS)


def test_a_bad_filter_fails_before_any_model_loads_and_a_whole_query_works(chats: Workspace, tiny_model_dir: Path, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import curate.stages.pipeline as pipeline

    real = pipeline.open_scorer
    monkeypatch.setattr(pipeline, "open_scorer", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["score", "-w", str(chats.root), "--model", "any", "--where", "select example_id from examples limt 4"]) == 1
    error = capsys.readouterr().err
    assert "is not usable SQL" in error and "whole query that returns example_id" in error
    assert main(["generate", "-w", str(chats.root), "--teacher", "any", "--from", "split = "]) == 1
    assert "--from 'split = ' is not usable SQL" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "open_scorer", real)
    query = "select example_id from examples order by example_id limit 4"
    assert main(["score", "-w", str(chats.root), "--model", str(tiny_model_dir), "--engine", "transformers", "--dtype", "float32",
                 "--where", query, "--quiet"]) == 0
    assert _counts(chats) == [("chat", 4, 4)]


def test_the_fingerprint_covers_weights_tokenizer_and_chat_template(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from curate.kernel import fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first = fingerprint.model_fingerprint(model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) > 3 << 20
    data[len(data) // 2] ^= 1  # one bit in the middle: the old hash read only the first and last MiB
    weights.write_bytes(bytes(data))
    changed_weights = fingerprint.model_fingerprint(model)
    template = model / "chat_template.jinja"  # newer tokenizers keep it apart from tokenizer_config.json
    if template.is_file():
        template.write_text(template.read_text().replace("You are a helpful", "You are a careful"))
    else:
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["chat_template"] = config["chat_template"].replace("You are a helpful", "You are a careful")
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    changed_template = fingerprint.model_fingerprint(model)
    (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text() + " ")
    changed_tokenizer = fingerprint.model_fingerprint(model)
    assert len({first, changed_weights, changed_template, changed_tokenizer}) == 4
    reads = []
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: reads.append(path) or "x")
    assert fingerprint.model_fingerprint(model) == changed_tokenizer and reads == []  # unchanged files: from the cache


def test_the_generation_key_covers_the_teachers_context_limit() -> None:
    from curate.models.engines import ModelIdentity
    from curate.models.teacher import Sampling, Teacher
    from curate.stages.generate import generation_key
    from curate.stages.prompts import templates_for

    identity = ModelIdentity("t", "/t", "f" * 16, "float32")
    templates = templates_for("auto", purpose="cot")
    short, long = (generation_key(Teacher(None, None, identity, "0", limit), templates, Sampling()) for limit in (2048, 4096))
    assert short != long


def test_auto_precision_follows_the_machine_and_the_key_records_it(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from curate.kernel import machine

    monkeypatch.setattr(machine, "native_bf16", lambda: False)  # an AVX2-only CPU
    emulated = open_scorer(str(tiny_model_dir), engine="transformers", dtype="auto", top_k=2)
    assert emulated.identity.dtype == "float32" and emulated.engine.dtype == "float32"
    monkeypatch.setattr(machine, "native_bf16", lambda: True)
    native = open_scorer(str(tiny_model_dir), engine="transformers", dtype="auto", top_k=2)
    assert native.identity.dtype == "bfloat16" and native.head.is_low_precision
    assert native.key != emulated.key and native.spec.model["dtype"] == "bfloat16"
    assert machine.resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        machine.resolve_precision("fp8")


def test_progress_moves_within_a_shard(chats: Workspace, tiny_scorer, monkeypatch: pytest.MonkeyPatch) -> None:
    import curate.stages.score
    from curate.store.examples import TokenProgress

    monkeypatch.setitem(curate.stages.score.BATCH_TOKENS, "cpu", 60)  # a few examples per engine call
    updates = []
    real_done = TokenProgress.done
    monkeypatch.setattr(TokenProgress, "done", lambda self, tokens: updates.append(tokens) or real_done(self, tokens))
    report = score(chats, tiny_scorer, shard_size=128, progress=False)  # one shard
    assert len(updates) >= 5 and sum(updates) == report.tokens_scored


def test_engines_share_a_gpu() -> None:
    from curate.kernel.vllm_factory import EngineOptions, gpu_share, parse_engine_args

    assert gpu_share(1, 0.99) == 0.85 and gpu_share(2, 0.99) == 0.425  # a pair: half each
    assert gpu_share(1, 0.5) == 0.45  # another engine holds half: take what is free
    with pytest.raises(RuntimeError, match="only 8% of its memory free"):
        gpu_share(1, 0.08)
    assert parse_engine_args(["enable-prefix-caching=true", "kv_cache_dtype=fp8", "max_num_batched_tokens=4096"]) == (
        ("enable_prefix_caching", True), ("kv_cache_dtype", "fp8"), ("max_num_batched_tokens", 4096))
    assert EngineOptions(gpu_memory_utilization=0.5).identity() == EngineOptions().identity()  # speed, not results
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_engine_args(["oops"])
