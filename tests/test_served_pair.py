"""A pair scored through two real pooling servers (`vllm serve --runner pooling`, the bundled SmolLM2 and a
second model with its tokenizer) gives the pair rows an in-process pair gives, and InstructDiff selects the
same examples from either; two log-prob servers give the log-ratio and no KL, and a KL recipe refuses them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from curate.cli import main
from curate.models.scorer import open_scorer
from curate.models.served import POOLING_ARGS, local_server
from curate.stages.recipes import load_recipe
from curate.stages.score import score_pair
from curate.stages.select import select
from curate.store.sql import connect
from curate.store.workspace import Workspace

pytestmark = [pytest.mark.model, pytest.mark.slow]
SUBSET = "example_id < '01'"  # 8 GSM8K problems


@pytest.fixture(scope="module")
def calibrated_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model that shares SmolLM2's tokenizer and template: SmolLM2 with its final norm scaled by 1.1
    (a stand-in for a calibrated copy: what the pair needs is another distribution over the same tokens)."""
    from safetensors.torch import load_file, save_file

    target = tmp_path_factory.mktemp("calibrated") / "smollm2-calibrated"
    shutil.copytree(smollm2_dir, target)
    weights = target / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return target


def _pair_rows(ws: Workspace, pair_key: str) -> dict[str, dict]:
    rows = connect(ws).execute("select example_id, n_tokens, kl, log_ratio from pair_scores where pair_key = ?", [pair_key]).fetchall()
    return {r[0]: {"n_tokens": r[1], "kl": r[2], "log_ratio": r[3]} for r in rows}


def _only_pair_key(ws: Workspace) -> str:
    keys = connect(ws).execute("select distinct pair_key from pair_scores").fetchall()
    assert len(keys) == 1, keys
    return keys[0][0]


def test_a_served_pair_gives_the_in_process_pair_rows_and_the_same_instructdiff(
        smollm2_dir: Path, calibrated_dir: Path, fresh: Workspace) -> None:
    with local_server(smollm2_dir, *POOLING_ARGS, name="base") as base_url, \
            local_server(calibrated_dir, *POOLING_ARGS, name="calibrated") as calibrated_url:
        assert main(["score", "-w", str(fresh.root), "--pair-endpoints", base_url, calibrated_url, "--where", SUBSET, "--quiet"]) == 0
    served_keys = connect(fresh).execute("select pair_key, base_key, calibrated_key from pair_scores limit 1").fetchone()
    base = open_scorer(str(smollm2_dir), engine="vllm", dtype="float32", together=2)
    calibrated = open_scorer(str(calibrated_dir), engine="vllm", dtype="float32", together=2)
    try:
        local = score_pair(fresh, base, calibrated, where=SUBSET, progress=False)
    finally:
        base.close()
        calibrated.close()
    assert local.key != served_keys[0]  # another identity: the servers' (and the heads' fingerprints), not in-process models
    served_rows, local_rows = _pair_rows(fresh, served_keys[0]), _pair_rows(fresh, local.key)
    assert served_rows.keys() == local_rows.keys() and len(served_rows) == 8
    for example, row in served_rows.items():
        other = local_rows[example]
        assert row["n_tokens"] == other["n_tokens"]
        for column in ("kl", "log_ratio"):
            a, b = np.array(row[column][1:], dtype=float), np.array(other[column][1:], dtype=float)
            assert np.max(np.abs(a - b)) < 1e-4, (example, column)  # the same float32 hidden states through the same heads
        assert np.nanmax(np.array(row["kl"][1:], dtype=float)) > 0  # two different models
    recipe = load_recipe("instructdiff")

    def chosen(base_key: str, calibrated_key: str, name: str) -> list[str]:
        select(fresh, recipe, name=name, params={"base_key": base_key, "calibrated_key": calibrated_key, "split": recipe_split,
                                                 "trim": "0.1", "share": "0.3"})
        return [i for (i,) in connect(fresh).execute(f'select example_id from "selections_{name}" order by 1').fetchall()]

    split = connect(fresh).execute(f"select split from examples where {SUBSET} group by 1 order by count(*) desc limit 1").fetchone()[0]
    recipe_split = split  # the subset's larger split: the recipe draws from one split
    served_ids = chosen(served_keys[1], served_keys[2], "served")
    assert served_ids and served_ids == chosen(base.key, calibrated.key, "local")


def test_two_logprob_servers_give_the_log_ratio_without_kl(served_smollm2: str, fresh: Workspace) -> None:
    """A generating server has prompt log-probs, not hidden states: the pair's log-ratio (0 here: the same model
    twice) and no KL, which the KL recipes refuse."""
    assert main(["score", "-w", str(fresh.root), "--pair-endpoints", served_smollm2, served_smollm2, "--where", SUBSET,
                 "--quiet"]) == 0
    rows = _pair_rows(fresh, _only_pair_key(fresh))
    assert len(rows) == 8
    for row in rows.values():
        assert all(v is None or np.isnan(v) for v in row["kl"])
        assert np.max(np.abs(np.array(row["log_ratio"][1:], dtype=float))) < 1e-5
    pair_key, base_key = connect(fresh).execute("select pair_key, base_key from pair_scores limit 1").fetchone()
    with pytest.raises(ValueError, match="needs"):
        select(fresh, load_recipe("eksft_offline"), name="no_kl", params={"base_key": base_key, "pair_key": pair_key})
