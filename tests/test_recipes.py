"""Each SQL recipe on given input rows, against expected output rows; the select audits and manifest."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from curate import schema
from curate.recipes import load_recipe
from curate.select import AuditError, run_recipe, select
from curate.workspace import Workspace

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
    # base: NLL 1.0, H 1.0 everywhere; calibrated: delta_nll = i/10 - 0.5, delta_entropy as listed
    delta_entropy = [0.0, 0.5, -0.3, 0.2, -0.1, 0.4, 0.1, -0.2, 0.3, -0.5]
    samples(workspace, [(n, 1.0, 1.0, 100) for n in names], key="base")
    samples(workspace, [(n, 1.0 + i / 10 - 0.5, 1.0 - delta_entropy[i - 1], 100) for i, n in enumerate(names, start=1)], key="cal")
    # trim 0.1 drops e01 (lowest delta_nll) and e10 (highest); of e02..e09 the lowest delta_entropy: e03 (-0.3), e08 (-0.2)
    assert ids(workspace, "instructdiff", base_key="base", calibrated_key="cal", fraction=0.2) == ["e03", "e08"]
    # a 300-token budget: e03, e08, e05 (-0.1), in delta_entropy order
    assert ids(workspace, "instructdiff", base_key="base", calibrated_key="cal", budget_tokens=300) == ["e03", "e05", "e08"]


def test_complexity_split(workspace: Workspace) -> None:
    names = [f"e{i}" for i in range(1, 9)]
    examples(workspace, names)
    put(workspace, "probe_scores", [{"example_id": n, "probe_key": "p", "entropy_norm": i / 10, "is_valid": n != "e4",
                                     "reference_answer": f"{i}"} for i, n in enumerate(names, start=1)])
    put(workspace, "best_traces", [
        {"example_id": "e8", "gen_key": "g", "rule": "shortest", "text": "step by step... #### 8", "is_correct": True, "truncated": False},
        {"example_id": "e7", "gen_key": "g", "rule": "shortest", "text": "wrong #### 1", "is_correct": False, "truncated": False},
    ])
    table = run_recipe(workspace, load_recipe("complexity_split"), {"probe_key": "p", "gen_key": "g"}).to_pylist()
    got = {r["example_id"]: (r["bucket"], r["assistant_text"]) for r in table}
    # valid entropies 0.1 0.2 0.3 0.5 0.6 0.7 0.8: q25 = 0.25, q75 = 0.65
    assert got == {"e1": ("easy", "1"), "e2": ("easy", "2"), "e3": ("middle", "3"), "e5": ("middle", "5"),
                   "e6": ("middle", "6"), "e8": ("hard", "step by step... #### 8")}  # e7: hard, no correct trace


def token_row(example: str, key: str, response: list[bool], **lists) -> dict:
    n = len(response)
    return {"example_id": example, "score_key": key, "variant": "chat", "token_ids": list(range(100, 100 + n)),
            "is_response": response, "n_tokens": n, **lists}


def test_eksft_offline_masks_top_entropy_and_kl_but_keeps_the_end_of_turn(workspace: Workspace) -> None:
    examples(workspace, ["e1"])
    response = [False, False, True, True, True, True, True]  # the last response token is <|im_end|>
    put(workspace, "token_scores", [token_row("e1", "base", response, entropy=[None, 9.0, 0.1, 2.0, 0.3, 0.2, 5.0])])
    put(workspace, "pair_scores", [{"example_id": "e1", "pair_key": "pair", "base_key": "base", "is_response": response,
                                    "kl": [None, 9.0, 0.1, 0.2, 0.3, 0.9, 0.0]}])
    (row,) = run_recipe(workspace, load_recipe("eksft_offline"), {"base_key": "base", "pair_key": "pair", "ratio": "0.2"}).to_pylist()
    # k = ceil(0.2 x 5) = 1: top entropy is the end-of-turn (kept anyway), top KL is position 6
    assert row["loss_mask"] == [0, 0, 1, 1, 1, 0, 1] and row["n_response_tokens"] == 5


def test_qtuning_offline_quadrants_and_q2_token_pruning(workspace: Workspace) -> None:
    names = [f"e{i}" for i in range(1, 9)]
    examples(workspace, names)
    # e1: highest NLL, lowest entropy (Q2); e2: lowest NLL, highest entropy (Q4); the rest on the diagonal
    rows = [("e1", 3.0, 0.1, 5), ("e2", 0.1, 3.0, 5)] + [(f"e{i}", 0.2 * i, 0.2 * i, 5) for i in range(3, 9)]
    samples(workspace, rows)
    ppl = [1.0, 10.0, 1.0, 1.0, 2.0]
    response = [False, True, True, True, True, True]
    put(workspace, "token_scores", [token_row("e1", KEY, response, logprob=[None] + [-math.log(p) for p in ppl])])
    table = run_recipe(workspace, load_recipe("qtuning_offline"), {"score_key": KEY, "r_sample": "0.25"}).to_pylist()
    got = {r["example_id"]: r for r in table}
    assert {k: v["bucket"] for k, v in got.items()} == {"e1": "q2", "e2": "q4"}
    # s = 0.5 ppl + 0.5 (prev + next): 6, 6, 6, 2, 2.5 -> keep the 3 lowest (ties by position) = tokens 1, 4, 5
    assert got["e1"]["loss_mask"] == [0, 1, 0, 0, 1, 1] and got["e2"]["loss_mask"] is None


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
                    "[0, 0, 0]::tinyint[] as loss_mask union all select 'e02', [1, 2], [false, true], [0, 0]::tinyint[]")
    with pytest.raises(AuditError, match="all_zero_mask: 2 row.*\n.*end_of_turn_not_trained: 2 row"):
        select(scored, load_recipe(zero), name="zero")
    assert not scored.table_dir("selections/bad").exists()
    with pytest.raises(ValueError, match="unknown parameter"):
        select(scored, load_recipe("full"), name="x", params={"budget": "3"})
    with pytest.raises(ValueError, match=r"\['score_key'\] have no default"):
        select(scored, load_recipe("longest"), name="x")


def test_recipe_results_reach_polars_unchanged(scored: Workspace) -> None:
    import polars as pl

    from curate.sql import connect

    table = run_recipe(scored, load_recipe("entropy_band"), {"score_key": KEY, "band": "max", "fraction": "0.5"})
    frame = pl.from_arrow(table)
    select(scored, load_recipe("entropy_band"), name="top", params={"score_key": KEY, "band": "max", "fraction": "0.5"})
    written = connect(scored).sql("select example_id, mean_entropy from selections_top order by example_id").pl()
    assert frame.select("example_id", "mean_entropy").equals(written)


def test_eksft_offline_matches_a_python_reference_on_random_rows(workspace: Workspace) -> None:
    import numpy as np

    rng = np.random.default_rng(7)
    names = [f"r{i:02d}" for i in range(30)]
    examples(workspace, names)
    tokens, pairs, expected = [], [], {}
    for name in names:
        n = int(rng.integers(6, 40))
        prompt = int(rng.integers(1, n - 3))
        response = [False] * prompt + [True] * (n - prompt)
        entropy = [None] + rng.integers(0, 5, n - 1).astype(float).tolist()  # ties on purpose
        kl = [None] + rng.integers(0, 5, n - 1).astype(float).tolist()
        tokens.append(token_row(name, "base", response, entropy=entropy))
        pairs.append({"example_id": name, "pair_key": "pair", "base_key": "base", "is_response": response, "kl": kl})
        positions = [i for i in range(n) if response[i]]
        k = math.ceil(0.3 * len(positions))
        by_entropy = sorted(positions, key=lambda i: (-entropy[i], i))[:k]  # ties: the earlier token first
        by_kl = sorted(positions, key=lambda i: (-kl[i], i))[:k]
        masked = set(by_entropy) | set(by_kl)
        expected[name] = [0 if not response[i] else 1 if i == positions[-1] else 0 if i in masked else 1 for i in range(n)]
    put(workspace, "token_scores", tokens)
    put(workspace, "pair_scores", pairs)
    table = run_recipe(workspace, load_recipe("eksft_offline"), {"base_key": "base", "pair_key": "pair", "ratio": "0.3"})
    assert {r["example_id"]: r["loss_mask"] for r in table.to_pylist()} == expected


def test_qtuning_offline_token_mask_matches_a_python_reference_on_multi_turn_rows(workspace: Workspace) -> None:
    import numpy as np

    rng = np.random.default_rng(11)
    names = [f"r{i:02d}" for i in range(20)]
    examples(workspace, names)
    # r10..r19: high NLL, low entropy -> Q2 at the widest alpha; r00..r09 the mirror image -> Q4
    samples(workspace, [(name, 1.0 + i if i >= 10 else 0.1 * i, 0.1 * (20 - i) if i >= 10 else 5.0 + i, 9) for i, name in enumerate(names)])
    tokens, expected = [], {}
    for name in names[10:]:
        turns = [(int(rng.integers(1, 4)), int(rng.integers(2, 7))) for _ in range(int(rng.integers(1, 4)))]
        response = [False] + [flag for prompt, reply in turns for flag in [False] * prompt + [True] * reply]
        ppl = [None] + rng.integers(1, 4, len(response) - 1).astype(float).tolist()  # ties on purpose
        logprob = [None] + np.float32([-math.log(p) for p in ppl[1:]]).tolist()  # token_scores holds float32
        tokens.append(token_row(name, KEY, response, logprob=logprob))
        positions = [i for i, flag in enumerate(response) if flag]  # neighbours: the previous and next response tokens
        values = [math.exp(-logprob[i]) for i in positions]
        score = [0.5 * values[j] + 0.5 * ((values[j - 1] if j else values[j]) + (values[j + 1] if j + 1 < len(values) else values[j]))
                 for j in range(len(values))]
        kept = {positions[j] for j in sorted(range(len(values)), key=lambda j: (score[j], j))[: math.ceil(0.4 * len(values))]}
        expected[name] = [1 if flag and (i in kept or i == positions[-1]) else 0 for i, flag in enumerate(response)]
    put(workspace, "token_scores", tokens)
    table = run_recipe(workspace, load_recipe("qtuning_offline"), {"score_key": KEY, "r_sample": "1.0", "r_token": "0.4"}).to_pylist()
    assert {r["example_id"]: r["bucket"] for r in table} == {name: "q2" if name >= "r10" else "q4" for name in names}
    assert {r["example_id"]: r["loss_mask"] for r in table if r["bucket"] == "q2"} == expected


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

    from curate.select import read_manifest

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
