"""Each SQL recipe on given input rows, against expected output rows; the select audits and manifest."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from conftest import REPO
from curate.store import schema
from curate.stages.recipes import load_recipe
from curate.stages.select import AuditError, run_recipe, select
from curate.store.workspace import Workspace

KEY = "k"


def put(ws: Workspace, table: str, rows: list[dict]) -> None:
    table_schema = schema.TABLES.get(table.split("/")[0])
    full = [{name: row.get(name) for name in table_schema.names} for row in rows]
    ws.write_part(table, pa.Table.from_pylist(full, schema=table_schema), schema=table_schema)


def examples(ws: Workspace, ids: list[str], split: str = "pool") -> None:
    put(ws, "examples", [{"example_id": i, "source": "t", "split": split, "reference_answer": f"ans-{i}",
                          "messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
                         for i in ids])


def samples(ws: Workspace, rows: list[tuple], key: str = KEY) -> None:
    """rows: (example_id, mean_nll, mean_entropy, n_response_tokens[, ifd])"""
    put(ws, "sample_scores", [{"example_id": r[0], "score_key": key, "mean_nll": r[1], "ppl": math.exp(r[1]),
                               "mean_entropy": r[2], "n_response_tokens": r[3], "ifd": r[4] if len(r) > 4 else None}
                              for r in rows])


def ids(ws: Workspace, recipe: str, **params) -> list[str]:
    table = run_recipe(ws, load_recipe(recipe), {k: str(v) for k, v in params.items()})
    return table.column("example_id").to_pylist()


@pytest.fixture
def scored(workspace: Workspace) -> Workspace:
    names = [f"e{i:02d}" for i in range(1, 11)]
    examples(workspace, names)
    examples(workspace, ["h01"], split="heldout")
    # e01..e10: NLL rises with the index (ppl 1.1 .. 2.0 nats), entropy falls, length rises, IFD spread out
    samples(workspace, [(n, 0.1 * i, 2.0 - 0.1 * i, 10 * i, [0.5, 0.9, 1.2, 0.3, 0.95, 0.1, 0.7, 0.8, 0.2, 0.6][i - 1])
                        for i, n in enumerate(names, start=1)] + [("h01", 5.0, 5.0, 999, 0.5)])
    return workspace


def test_full_takes_the_split(scored: Workspace) -> None:
    assert len(ids(scored, "full")) == 10 and ids(scored, "full", split="heldout") == ["h01"]


def test_score_baselines(scored: Workspace) -> None:
    assert ids(scored, "ppl_band", score_key=KEY, band="min", fraction=0.2) == ["e01", "e02"]
    assert ids(scored, "ppl_band", score_key=KEY, band="max", fraction=0.2) == ["e09", "e10"]
    assert ids(scored, "ppl_band", score_key=KEY, band="mid", fraction=0.2) == ["e05", "e06"]  # ranks 4/9 and 5/9
    assert ids(scored, "entropy_band", score_key=KEY, band="max", fraction=0.3) == ["e01", "e02", "e03"]
    assert ids(scored, "entropy_band", score_key=KEY, band="min", fraction=0.1) == ["e10"]
    assert ids(scored, "ifd", score_key=KEY, fraction=0.2) == ["e02", "e05"]  # 0.95, 0.9; e03 (1.2) is left out
    assert ids(scored, "longest", score_key=KEY, fraction=0.2) == ["e09", "e10"]
    with pytest.raises(ValueError, match="band must be min, mid or max"):
        ids(scored, "ppl_band", score_key=KEY, band="median")


def test_random_budget_fits_and_depends_on_the_seed(scored: Workspace) -> None:
    table = run_recipe(scored, load_recipe("random_budget"), {"score_key": KEY, "budget_tokens": "200"})
    assert 0 < sum(table.column("n_response_tokens").to_pylist()) <= 200
    picks = {tuple(ids(scored, "random_budget", score_key=KEY, budget_tokens=200, seed=s)) for s in range(6)}
    assert len(picks) > 1 and picks  # a different seed, a different draw
    assert ids(scored, "random_budget", score_key=KEY, budget_tokens=200, seed=3) == ids(scored, "random_budget", score_key=KEY, budget_tokens=200, seed=3)


def test_instructdiff(workspace: Workspace) -> None:
    names = [f"e{i:02d}" for i in range(1, 11)]
    examples(workspace, names)
    # base: NLL 1.0, H 1.0 everywhere; calibrated NLL 1.5 - i/10, so diff_nll = NLL_base - NLL_cal = i/10 - 0.5
    delta_entropy = [0.0, 0.5, -0.3, 0.2, -0.1, 0.4, 0.1, -0.2, 0.3, -0.5]
    put(workspace, "sample_scores", [{"example_id": n, "score_key": "base", "mean_nll_content": 1.0, "mean_entropy_content": 1.0,
                                      "n_content_tokens": 100} for n in names])
    put(workspace, "sample_scores", [{"example_id": n, "score_key": "cal", "mean_nll_content": 1.5 - i / 10,
                                      "mean_entropy_content": 1.0 - delta_entropy[i - 1], "n_content_tokens": 100}
                                     for i, n in enumerate(names, start=1)])
    # trim 0.1 drops e01 (lowest diff_nll) and e10 (highest); by diff_entropy: e03 (-0.3), e08 (-0.2), e05 (-0.1) ...
    # budget = int(0.1 x 1,000 tokens) = 100: e03 alone reaches it (the crossing example is included)
    assert ids(workspace, "instructdiff", base_key="base", calibrated_key="cal") == ["e03"]
    assert ids(workspace, "instructdiff", base_key="base", calibrated_key="cal", share=0.2) == ["e03", "e08"]  # 200 reached exactly
    assert ids(workspace, "instructdiff", base_key="base", calibrated_key="cal", share=0.21) == ["e03", "e05", "e08"]  # e05 crosses 210
    # the paper's text: max(1, int(0.3 x 8 trimmed)) = 2 examples
    assert ids(workspace, "instructdiff", base_key="base", calibrated_key="cal", budget="samples", share=0.3) == ["e03", "e08"]


def test_complexity_split(workspace: Workspace) -> None:
    names = [f"e{i}" for i in range(1, 9)]
    examples(workspace, names)
    put(workspace, "probe_scores", [{"example_id": n, "probe_key": "p", "entropy": i / 10, "is_valid": n != "e4"}
                                    for i, n in enumerate(names, start=1)])
    # the teacher answered every example but e6; its answers parse for e1, e2, e3 and e8
    answers = {"e1": "7", "e2": "2", "e3": "3", "e5": None, "e7": None, "e8": "8"}
    put(workspace, "traces", [{"trace_id": f"t{n}", "example_id": n, "gen_key": "g", "extracted_answer": a,
                               "prompt": [{"role": "user", "content": f"Solve step by step: q {n}"}]} for n, a in answers.items()])
    put(workspace, "best_traces", [{"example_id": n, "gen_key": "g", "rule": "shortest", "trace_id": f"t{n}", "truncated": False,
                                    "text": f"step by step... [[{a}]]" if a else "no answer", "is_correct": a == "8"}
                                   for n, a in answers.items()])
    table = run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g"}).to_pylist()
    got = {r["example_id"]: (r["stage"], r["bucket"], r["assistant_text"]) for r in table}
    # H / max H of the valid: 1/8 2/8 3/8 5/8 6/8 7/8 8/8: q25 = 0.3125, q75 = 0.8125
    # stage 1: the teacher's parsed answer (e5: none parses, e6: no reply: left out); stage 2: every hard reply
    assert got == {"e1": (1, "easy", "[[7]]"), "e2": (1, "easy", "[[2]]"), "e3": (1, "middle", "[[3]]"),
                   "e7": (2, "hard", "no answer"), "e8": (2, "hard", "step by step... [[8]]")}
    by_id = {r["example_id"]: r for r in table}
    script = [{"role": "system", "content": "The following are multiple choice questions. Explain your thinking process step-by-step. "
                                            "At the end, write the correct answer number using [[number]] format."},
              {"role": "user", "content": "Question: q e8\nPlease analyze step by step and provide the answer."}]
    assert by_id["e8"]["prompt"] == script  # the training script's own prompt, not the teacher's
    gold = run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g", "answer_source": "gold",
                                                                    "require_parsed": "true", "stage2_prompt": "teacher"}).to_pylist()
    assert {r["example_id"]: (r["stage"], r["assistant_text"]) for r in gold} == {  # the old rows: gold answers, parsed traces
        "e1": (1, "[[ans-e1]]"), "e2": (1, "[[ans-e2]]"), "e3": (1, "[[ans-e3]]"), "e5": (1, "[[ans-e5]]"), "e6": (1, "[[ans-e6]]"),
        "e8": (2, "step by step... [[8]]")}
    assert gold[-1]["prompt"] == [{"role": "user", "content": "Solve step by step: q e8"}]  # the teacher's own prompt
    with pytest.raises(Exception, match="answer_source must be distill or gold"):
        run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g", "answer_source": "teacher"})
    report = select(workspace, load_recipe("complexity_split"), name="complexity", params={"probe_key": "p", "gen_key": "g"})
    written = {r["example_id"]: r for r in pa.parquet.read_table(workspace.table_dir("selections/complexity") / "part-0.parquet").to_pylist()}
    assert report.rows == 5 and written["e1"]["messages"] == [
        {"role": "user", "content": "q e1\n\nAnswer with only one number in [[number]]."}, {"role": "assistant", "content": "[[7]]"}]
    assert written["e8"]["messages"][:2] == script and written["e8"]["stage"] == 2


def test_probed_is_what_the_teacher_answers_every_valid_example_not_only_the_hard_ones(workspace: Workspace) -> None:
    """Complexity-aware stage 1 trains the teacher's parsed answers of the easy and middle examples
    (Qwen_train_test_sft.py:184): the study's and the demo's preparation generate from `probed`."""
    examples(workspace, [f"e{i}" for i in range(8)])
    examples(workspace, ["h0"], split="heldout")
    put(workspace, "probe_scores", [{"example_id": n, "probe_key": "p", "entropy": i / 10, "entropy_norm": i / 10, "is_valid": n != "e3"}
                                    for i, n in enumerate([f"e{i}" for i in range(8)] + ["h0"])]
        + [{"example_id": "e5", "probe_key": "other", "entropy": 1.0, "is_valid": True}])
    assert ids(workspace, "probed", probe_key="p") == ["e0", "e1", "e2", "e4", "e5", "e6", "e7"]  # e3: invalid; h0: held out
    assert ids(workspace, "probed", probe_key="p", split="heldout") == ["h0"]
    assert ids(workspace, "probe_hard", probe_key="p") == ["e6", "e7"]  # the old source: the hard quarter only
    prepare_source = (REPO / "curate" / "experiments" / "study" / "prepare.py").read_text()
    assert 'load_recipe("probed")' in prepare_source and 'load_recipe("probe_hard")' not in prepare_source


def token_row(example: str, key: str, response: list[bool], **lists) -> dict:
    n = len(response)
    return {"example_id": example, "score_key": key, "variant": "chat", "token_ids": list(range(100, 100 + n)),
            "is_response": response, "n_tokens": n, "message_index": [0] * n, **lists}


def test_eksft_offline_masks_top_entropy_and_kl_per_example(workspace: Workspace) -> None:
    examples(workspace, ["e1"])
    response = [False, False, True, True, True, True, True]  # the last response token is <|im_end|>
    end = [False] * 6 + [True]
    put(workspace, "token_scores", [token_row("e1", "base", response, entropy=[None, 9.0, 0.1, 2.0, 0.3, 0.2, 5.0], is_end_of_turn=end)])
    put(workspace, "pair_scores", [{"example_id": "e1", "pair_key": "pair", "base_key": "base", "is_response": response,
                                    "kl": [None, 9.0, 0.1, 0.2, 0.3, 0.9, 0.0]}])
    (row,) = run_recipe(workspace, load_recipe("eksft_offline"), {"base_key": "base", "pair_key": "pair"}).to_pylist()
    # k = floor(0.2 x 5) = 1: top entropy is the end-of-turn (a candidate, as in the reference), top KL position 6
    assert row["loss_mask"] == [0, 0, 1, 1, 1, 0, 0] and row["n_response_tokens"] == 5
    (kept,) = run_recipe(workspace, load_recipe("eksft_offline"), {"base_key": "base", "pair_key": "pair", "keep_end_of_turn": "true"}).to_pylist()
    assert kept["loss_mask"] == [0, 0, 1, 0, 1, 0, 1]  # the end-of-turn protected: the next by entropy (2.0) goes


def test_qtuning_offline_quadrants_and_q2_token_pruning(workspace: Workspace) -> None:
    from curate.store.score_tables import rebuild_sample_scores

    names = [f"e{i}" for i in range(1, 9)]
    examples(workspace, names)
    # e1: highest NLL, lowest entropy (Q2); e2: lowest NLL, highest entropy (Q4); the rest on the diagonal
    rows = []
    for i, name in enumerate(names, start=1):
        nll = {1: 3.0, 2: 0.1}.get(i, 0.2 * i)
        entropy = {1: 0.1, 2: 3.0}.get(i, 0.2 * i)
        rows.append(token_row(name, KEY, [False, True, True, True, True, True], logprob=[None] + [-nll] * 5, entropy=[None] + [entropy] * 5))
    put(workspace, "token_scores", rows)
    rebuild_sample_scores(workspace, KEY)
    table = run_recipe(workspace, load_recipe("qtuning_offline"), {"score_key": KEY, "r_sample": "0.25"}).to_pylist()
    got = {r["example_id"]: r for r in table}
    assert {k: v["bucket"] for k, v in got.items()} == {"e1": "q2", "e2": "q4"}
    # T = 8 x 5 = 40 positions; keep round(40 x 0.25 x 0.5) = 5; the 6 dropped examples remove 30, the Q2
    # example must lose 5 more: all of its response tokens. (select then drops it: every token masked.)
    # Q4 is kept whole: under the reference's span (slot) its mask says so, under content_eot it carries none
    assert got["e1"]["loss_mask"] == [0, 0, 0, 0, 0, 0] and got["e2"]["loss_mask"] == [0, 1, 1, 1, 1, 1]
    content_eot = run_recipe(workspace, load_recipe("qtuning_offline"), {"score_key": KEY, "r_sample": "0.25", "span": "content_eot"})
    assert {r["example_id"]: r["loss_mask"] for r in content_eot.to_pylist()} == {"e1": [0, 0, 0, 0, 0, 0], "e2": None}


def test_qtuning_offline_prunes_no_token_at_r_token_one(workspace: Workspace) -> None:
    from curate.store.score_tables import rebuild_sample_scores

    names = [f"e{i}" for i in range(1, 9)]
    examples(workspace, names)
    # e1 (Q2) and e2 (Q4) have 10 response tokens, the six on the diagonal 2
    rows = []
    for i, name in enumerate(names, start=1):
        nll, entropy, n = {1: 3.0, 2: 0.1}.get(i, 0.2 * i), {1: 0.1, 2: 3.0}.get(i, 0.2 * i), 11 if i <= 2 else 3
        rows.append(token_row(name, KEY, [False] + [True] * (n - 1), logprob=[None] + [-nll] * (n - 1), entropy=[None] + [entropy] * (n - 1)))
    put(workspace, "token_scores", rows)
    rebuild_sample_scores(workspace, KEY)

    def masks(r_token: str) -> dict:
        table = run_recipe(workspace, load_recipe("qtuning_offline"), {"score_key": KEY, "r_sample": "0.25", "r_token": r_token})
        return {r["example_id"]: r["loss_mask"] for r in table.to_pylist()}

    # T = 2 x 10 + 6 x 2 = 32 positions; the budget keeps round(32 x 0.25 x r_token) = 8; the dropped rows remove
    # 12, so the budget asks for 12 more from e1; at r_token = 1.0 the reference prunes none (trainer.py:683)
    assert masks("1.0") == {"e1": [0] + [1] * 10, "e2": [0] + [1] * 10}
    assert masks("0.99") == {"e1": [0] * 11, "e2": [0] + [1] * 10}


def test_select_materializes_with_a_manifest_and_audits(scored: Workspace, tmp_path) -> None:
    report = select(scored, load_recipe("ppl_band"), name="hard", params={"score_key": KEY, "band": "max", "fraction": "0.2"})
    assert report.rows == 2 and report.buckets == {"ppl_max": 2}
    folder = scored.table_dir("selections/hard")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["parameters"] == {"score_key": KEY, "band": "max", "fraction": 0.2, "split": "pool"}
    assert manifest["sql_hash"] and set(manifest["inputs"]) == {"examples", "sample_scores"}
    written = pa.parquet.read_table(folder / "part-0.parquet").to_pylist()
    assert [r["example_id"] for r in written] == ["e09", "e10"] and written[0]["messages"][1]["content"] == "a e09"
    again = select(scored, load_recipe("ppl_band"), name="hard", params={"score_key": KEY, "band": "min", "fraction": "0.1"})
    assert again.rows == 1 and len(list(folder.glob("*.parquet"))) == 1  # replaced whole, never mixed
    dry = select(scored, load_recipe("full"), name="dry", dry_run=True)
    assert dry.rows == 10 and not scored.table_dir("selections/dry").exists()

    bad = tmp_path / "bad.sql"
    bad.write_text("select 'e01' as example_id union all select 'e01' union all select 'nope'")
    with pytest.raises(AuditError, match="duplicate_example_id: 1 row.*\n.*unknown_example_id: 1 row"):
        select(scored, load_recipe(bad), name="bad")
    zero = tmp_path / "zero.sql"
    zero.write_text("select 'e01' as example_id, [1, 2, 3] as token_ids, [false, true, true] as is_response, "
                    "[0, 0, 0]::tinyint[] as loss_mask union all select 'e02', [1, 2], [false, true], [0, 0]::tinyint[] "
                    "union all select 'e03', [1, 2, 3], [false, true, true], [0, 1, 1]::tinyint[]")
    report = select(scored, load_recipe(zero), name="zero")  # a row whose mask trains nothing is dropped, counted
    assert report.rows == 1 and report.dropped == {"every_token_masked": 2}
    eot = tmp_path / "eot.sql"
    eot.write_text("select 'e01' as example_id, [1, 2, 3] as token_ids, [false, true, true] as is_response, [0, 1, 0]::tinyint[] as loss_mask")
    with pytest.raises(AuditError, match="end_of_turn_not_trained: 1 row"):
        select(scored, load_recipe(eot), name="eot")
    eot.write_text("-- name: eot\n-- audits: duplicate_example_id, unknown_example_id\n" + eot.read_text())
    assert select(scored, load_recipe(eot), name="eot").rows == 1  # the header names the audits that apply
    assert not scored.table_dir("selections/bad").exists()
    with pytest.raises(ValueError, match="unknown parameter"):
        select(scored, load_recipe("full"), name="x", params={"budget": "3"})
    with pytest.raises(ValueError, match=r"\['score_key'\] have no default"):
        select(scored, load_recipe("longest"), name="x")


def test_recipe_results_reach_polars_unchanged(scored: Workspace) -> None:
    import polars as pl

    from curate.store.sql import connect

    table = run_recipe(scored, load_recipe("entropy_band"), {"score_key": KEY, "band": "max", "fraction": "0.5"})
    frame = pl.from_arrow(table)
    select(scored, load_recipe("entropy_band"), name="top", params={"score_key": KEY, "band": "max", "fraction": "0.5"})
    written = connect(scored).sql("select example_id, mean_entropy from selections_top order by example_id").pl()
    assert frame.select("example_id", "mean_entropy").equals(written)


def test_probe_hard_takes_the_valid_examples_at_or_above_the_high_quantile(workspace: Workspace) -> None:
    names = [f"e{i}" for i in range(1, 10)]
    examples(workspace, names)
    examples(workspace, ["h1"], split="heldout")
    put(workspace, "probe_scores", [{"example_id": n, "probe_key": "p", "entropy_norm": i / 10, "is_valid": n != "e9"}
                                    for i, n in enumerate(names, start=1)]
        + [{"example_id": "h1", "probe_key": "p", "entropy_norm": 0.99, "is_valid": True},
           {"example_id": "e1", "probe_key": "other", "entropy_norm": 0.99, "is_valid": True}])
    # valid pool entropies 0.1 .. 0.8: q75 (linear) = 0.625 -> e7 (0.7), e8 (0.8); e9 is invalid, h1 held out
    assert ids(workspace, "probe_hard", probe_key="p") == ["e7", "e8"]
    assert ids(workspace, "probe_hard", probe_key="p", high_quantile=0.5) == ["e5", "e6", "e7", "e8"]


def test_audits_refuse_a_mask_of_the_wrong_length_and_a_mask_on_a_replaced_reply(scored: Workspace, tmp_path) -> None:
    short = tmp_path / "short.sql"
    short.write_text("select 'e01' as example_id, [1, 2, 3] as token_ids, [false, true, true] as is_response, "
                     "[0, 1]::tinyint[] as loss_mask")
    with pytest.raises(AuditError, match="mask_length_differs: 1 row"):
        select(scored, load_recipe(short), name="short")
    replaced = tmp_path / "replaced.sql"
    replaced.write_text("select 'e01' as example_id, 'a new reply' as assistant_text, [1, 2, 3] as token_ids, "
                        "[false, true, true] as is_response, [0, 1, 1]::tinyint[] as loss_mask")
    with pytest.raises(AuditError, match="mask_with_replaced_answer: 1 row"):
        select(scored, load_recipe(replaced), name="replaced")
    assert not scored.table_dir("selections/short").exists() and not scored.table_dir("selections/replaced").exists()


def test_a_reselect_replaces_the_selection_in_one_rename_and_a_failed_one_keeps_it(scored: Workspace, tmp_path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from curate.stages.select import read_manifest

    select(scored, load_recipe("ppl_band"), name="band", params={"score_key": KEY, "band": "max", "fraction": "0.2"})
    part = scored.table_dir("selections/band") / "part-0.parquet"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((str(a), str(b))) or real_replace(a, b))
    select(scored, load_recipe("ppl_band"), name="band", params={"score_key": KEY, "band": "min", "fraction": "0.1"})
    into_selection = [target for _, target in renames if "/selections/" in target]
    assert into_selection[0] == str(part)  # the new rows took the old file's place: no moment without a selection
    table = pa.parquet.read_table(part)
    assert table.num_rows == 1 and read_manifest(table)["parameters"]["band"] == "min"  # rows and manifest in one file
    bad = tmp_path / "bad.sql"
    bad.write_text("select 'nope' as example_id")
    with pytest.raises(AuditError):
        select(scored, load_recipe(bad), name="band")
    assert pa.parquet.read_table(part).num_rows == 1  # a failed select leaves the old selection as it was
    assert not [p for p in scored.table_dir("selections").rglob(".*")]  # and no temporaries


def test_an_empty_selection_is_refused_with_its_counts_and_keeps_the_earlier_one(scored: Workspace, tmp_path, capsys) -> None:
    from curate.cli import main
    from curate.stages.select import EmptySelection

    select(scored, load_recipe("ppl_band"), name="band", params={"score_key": KEY, "band": "max", "fraction": "0.2"})
    part = scored.table_dir("selections/band") / "part-0.parquet"
    before = part.read_bytes()
    masked = tmp_path / "masked.sql"  # a rule whose mask trains nothing in any row
    masked.write_text("select example_id, [1, 2, 3] as token_ids, [false, true, true] as is_response, [0, 0, 0]::tinyint[] as loss_mask "
                      "from examples where split = 'pool'")
    with pytest.raises(EmptySelection, match=r"no rows left: the recipe returned 10 row\(s\); dropped 10 \(every_token_masked\)\. "
                                             r"Nothing was written \(an earlier selection of this name is kept\)"):
        select(scored, load_recipe(masked), name="band")
    with pytest.raises(EmptySelection, match=r"returned 0 row\(s\)\. Nothing would be written"):
        select(scored, load_recipe("full"), name="dry", params={"split": "Pool"}, dry_run=True)
    assert part.read_bytes() == before  # the earlier selection of that name is untouched

    ws = str(scored.root)
    assert main(["select", "full", "-w", ws, "--param", "split=Pool", "--name", "band"]) == 1  # a typo that matches nothing
    err = capsys.readouterr().err
    assert "selection band (full.sql) has no rows left: the recipe returned 0 row(s)" in err and "split = 'Pool'" in err
    assert "--allow-empty" in err and part.read_bytes() == before
    assert main(["select", "full", "-w", ws, "--param", "split=Pool", "--name", "nothing", "--allow-empty"]) == 0
    assert pa.parquet.read_table(scored.table_dir("selections/nothing") / "part-0.parquet").num_rows == 0
    assert main(["select", "full", "-w", ws, "--param", "split=pool", "--name", "band"]) == 0  # the typo fixed
    assert pa.parquet.read_table(part).num_rows == 10
