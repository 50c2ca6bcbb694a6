"""A reference resolves by what a run is (its key, its model's fingerprint), not by the label it was started
with; every recipe's ``needs:`` names what it reads; ``select`` refuses a run that lacks it; a study prepares
what its arms need, or refuses its spec before any model loads."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl
from curate.experiments.study.prepare import planned_steps, prepare
from curate.experiments.study.spec import load_spec
from curate.models.scorer import open_scorer
from curate.stages.ingest import ingest
from curate.stages.recipes import NEEDS, RECIPE_DIR, ParameterError, load_recipe
from curate.stages.score import score, score_pair
from curate.stages.select import select
from curate.store.run_refs import ReferenceError, resolve
from curate.store.sql import connect
from curate.store.workspace import Workspace

CHATS = [{"prompt": f"Tom has {i} apples and buys {i % 7 + 2} more. How many apples does he have?",
          "completion": f"He has {i} + {i % 7 + 2} = {i + i % 7 + 2} apples.\n#### {i + i % 7 + 2}"} for i in range(40)]
OPTIONS = {"engine": "transformers", "dtype": "float32"}


def _ingested(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ingest([str(write_jsonl(tmp_path / "apples.jsonl", CHATS))], workspace=ws, answer_style="hash", heldout_fraction=0.2,
           progress=False)
    return ws


def _other_model(tiny_model_dir: Path, target: Path) -> Path:
    """The tiny model with other weights (a stand-in for a calibrated model: same tokenizer, another fingerprint)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.05)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


# ---- references ---------------------------------------------------------------------------------------------


def test_an_alias_and_its_path_that_name_one_run_resolve_to_it(tiny_model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """As a study does it: the single-model run records the alias, the pair run the same base model (same key)."""
    cache = tmp_path / "models"
    cache.mkdir()
    (cache / "tiny").symlink_to(tiny_model_dir)  # `tiny` is now an alias in the model cache
    monkeypatch.setenv("CURATE_MODELS", str(cache))
    ws = _ingested(tmp_path)
    calibrated_dir = _other_model(tiny_model_dir, tmp_path / "calibrated")
    alone = open_scorer("tiny", **OPTIONS)
    key = score(ws, alone, progress=False).key
    alone.close()
    base, calibrated = open_scorer("tiny", together=2, **OPTIONS), open_scorer(str(calibrated_dir), together=2, **OPTIONS)
    score_pair(ws, base, calibrated, progress=False)
    assert base.key == key  # one run key, recorded under two labels
    for reference in ("tiny", str(cache / "tiny"), str(tiny_model_dir)):
        assert resolve(ws, "score_run", reference, parameter="score_key") == key
    assert resolve(ws, "score_run", str(calibrated_dir)) == calibrated.key

    # a genuinely different model under a label the first one also answers to is still ambiguous
    elsewhere = tmp_path / "elsewhere" / "tiny"  # a copy of the calibrated model, in a folder named like the alias
    shutil.copytree(calibrated_dir, elsewhere)
    copy = open_scorer(str(elsewhere), **OPTIONS)
    score(ws, copy, progress=False)
    copy.close()
    with pytest.raises(ReferenceError, match=f"ambiguous: it matches runs of 2 models.*{calibrated.key}.*{key}|"
                                             f"ambiguous: it matches runs of 2 models.*{key}.*{calibrated.key}"):
        resolve(ws, "score_run", "tiny")
    assert resolve(ws, "score_run", str(elsewhere)) == calibrated.key  # same fingerprint as the calibrated model: one model
    base.close()
    calibrated.close()


# ---- needs --------------------------------------------------------------------------------------------------

# what a recipe's SQL reads -> the need its header must name
READS = {
    r"\b(sample_scores|token_scores)\b": "scores",
    r"entropy\b": "entropy",  # entropy, mean_entropy, diff_entropy (not entropy_norm)
    r"\bifd\b": "ifd",
    r"\bpair_scores\b|\bkl\b": "kl",
    r"\$calibrated_key\b": "calibrated",
    r"\bprobe_scores\b": "probe",
    r"\bbest_traces\b|\btraces\b": "traces",
}


def _body(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("--"))


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.sql")), ids=lambda p: p.stem)
def test_every_recipe_needs_what_it_reads(path: Path) -> None:
    recipe = load_recipe(path)
    body = _body(recipe.sql)
    read = {need for pattern, need in READS.items() if re.search(pattern, body)}
    if "probe" in read:
        read.discard("entropy")  # the probe's own entropy column, not a scoring run's
    assert read <= set(recipe.needs), f"{path.name} reads {sorted(read - set(recipe.needs))} but its header does not say so"
    assert set(recipe.needs) <= read, f"{path.name} declares {sorted(set(recipe.needs) - read)} it never reads"


def test_an_unknown_need_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "mine.sql"
    path.write_text("-- name: mine\n-- needs: scores, entrpy\nselect example_id from examples\n")
    with pytest.raises(ParameterError, match=r"unknown need\(s\) \['entrpy'\].*" + ", ".join(NEEDS)):
        load_recipe(path)


def _spec(tmp_path: Path, model: str, arms: str, prepare_section: str = "score = true") -> Path:
    path = tmp_path / "study.toml"
    path.write_text(f'''
name = "needs"
model = "{model}"
pool = "split = 'pool'"
heldout = "split = 'heldout'"
engine = "transformers"
dtype = "float32"

[prepare]
{prepare_section}

[[arms]]
name = "full"
{arms}
''')
    return path


IFD_ARM = '''
[[arms]]
name = "ifd"
recipe = "ifd"
params = { fraction = "1.0" }
'''


def test_select_refuses_a_run_without_ifd_and_a_study_with_an_ifd_arm_scores_with_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    ws = _ingested(tmp_path)
    plain = open_scorer(str(tiny_model_dir), **OPTIONS)
    key = score(ws, plain, progress=False).key  # no --ifd
    plain.close()
    with pytest.raises(ValueError, match=r"ifd.sql needs ifd, and score_key = .* has none.*curate score --model M --ifd"):
        select(ws, load_recipe("ifd"), name="hard", params={"score_key": key})
    assert not ws.table_dir("selections/hard").exists()

    spec = load_spec(_spec(tmp_path, str(tiny_model_dir), IFD_ARM))  # [prepare] says score, not ifd
    assert planned_steps(spec)["ifd"] is True
    keys = prepare(ws, spec, ws.root / "studies" / spec.name, progress=False)
    assert keys.score == key  # the same run, now with its response-only pass
    con = connect(ws)
    pool, with_ifd = con.execute("select count(*), count(s.ifd) from sample_scores s join examples e using (example_id) "
                                 "where s.score_key = ? and e.split = 'pool'", [key]).fetchall()[0]
    assert pool > 0 and with_ifd == pool
    arm = spec.arms[1]
    recipe = load_recipe(arm.recipe)
    params = dict(arm.params) | {n: keys.parameter(n, p.kind) for n, p in recipe.parameters.items() if p.kind == "score_run"}
    report = select(ws, recipe, name="study_needs_ifd", params=params)
    expected = con.execute("select count(*) from sample_scores s join examples e using (example_id) "
                           "where s.score_key = ? and e.split = 'pool' and s.ifd < 1", [key]).fetchall()[0][0]
    assert report.rows == expected > 0  # the arm selects rows: every pool example whose IFD is below 1


@pytest.mark.parametrize("arms, prepare_section, message", [
    ("[[arms]]\nname = \"eksft\"\nrecipe = \"eksft_offline\"", "score = true",
     r"arm 'eksft' \(recipe eksft_offline\) needs kl: add `calibrate = \{ fraction"),
    ("[[arms]]\nname = \"complexity\"\nrecipe = \"complexity_split\"", "probe = true",
     r"arm 'complexity' \(recipe complexity_split\) needs traces: add `traces = "),
    (IFD_ARM, "score = false", r"arm 'ifd' \(recipe ifd\) needs scores, and \[prepare\] sets score = false"),
    (IFD_ARM, "ifd = false", r"arm 'ifd' \(recipe ifd\) needs ifd, and \[prepare\] sets ifd = false"),
])
def test_a_study_missing_a_step_its_arms_need_is_refused_before_any_model_loads(tmp_path: Path, arms: str,
                                                                               prepare_section: str, message: str) -> None:
    ws = _ingested(tmp_path)
    spec = load_spec(_spec(tmp_path, str(tmp_path / "no-such-model"), arms, prepare_section))  # loading it would fail
    with pytest.raises(ValueError, match=message):
        prepare(ws, spec, ws.root / "studies" / spec.name, progress=False)
    assert not ws.has_table("token_scores")

