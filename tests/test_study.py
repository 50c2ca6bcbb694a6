"""curate study on a tiny model: every arm meets the budget within 2% (masked arms included, counted by the
trainer's own loader), an arm that cannot is reported, a killed study resumes without retraining finished
runs, and the report's numbers are the results table's."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from curate.stages.ingest import ingest
from curate.store.workspace import Workspace

pytestmark = pytest.mark.slow

CHATS = [{"prompt": f"Tom has {i} apples and buys {i % 7 + 2} more. How many apples does he have?",
          "completion": f"He has {i} + {i % 7 + 2} = {i + i % 7 + 2} apples.\n#### {i + i % 7 + 2}"} for i in range(90)]


def spec_file(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(f'''
name = "tiny"
model = "{model}"
pool = "split = 'pool'"
heldout = "split = 'heldout'"
heldout_limit = 6
budget = 0.25
seeds = [0, 1]
engine = "transformers"
dtype = "float32"

[training]
max_steps = 2
batch_size = 4
max_len = 96
precision = "float32"

[prepare]
score = true
calibrate = {{ fraction = 0.2, max_steps = 2, batch_size = 4, max_len = 96, precision = "float32" }}

[[arms]]
name = "full"

[[arms]]
name = "random"

[[arms]]
name = "instructdiff"
recipe = "instructdiff"
fit = {{ param = "share", low = 0.0, high = 1.0 }}

[[arms]]
name = "qtuning_offline"
recipe = "qtuning_offline"
params = {{ r_token = "1.0" }}  # at its default 0.5 it trains at most 332 tokens of this tiny pool, under the 355 budget
fit = {{ param = "r_sample", low = 0.05, high = 1.0 }}

[[arms]]
name = "eksft_offline"
recipe = "eksft_offline"

[[arms]]
name = "too_small"
recipe = "longest"
params = {{ fraction = "0.05" }}
''')
    return path


def test_a_study_meets_the_budget_resumes_and_reports_what_it_measured(tiny_model_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import curate.experiments.study.run as study
    from curate.experiments.study.budget import TokenCounter
    from curate.experiments.study.spec import load_spec
    from curate.experiments.study.run import run_study

    ws = Workspace(tmp_path / "ws")
    ingest([str(write_jsonl(tmp_path / "apples.jsonl", CHATS))], workspace=ws, answer_style="hash", heldout_fraction=0.2, progress=False)
    spec = load_spec(spec_file(tmp_path, tiny_model_dir))
    real = study.train_and_evaluate
    calls = []

    def dies_on_the_fourth(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed in the middle of the study
        return real(*args, **kwargs)

    monkeypatch.setattr(study, "train_and_evaluate", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_study(ws, spec, progress=False)
    finished = {path: path.stat().st_mtime_ns for path in (ws.root / "studies" / "tiny" / "runs").rglob("train_config.json")}
    assert len(calls) == 4 and len(finished) == 3
    calls.clear()
    monkeypatch.setattr(study, "train_and_evaluate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    folder = run_study(ws, spec, progress=False)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())  # finished runs not retrained
    assert len(calls) == 1 + 2 * 4 - 3  # full (one seed) + 4 arms x 2 seeds that can be trained, minus the 3 done

    results = pq.read_table(folder / "results.parquet").to_pylist()
    budget = {r["budget_tokens"] for r in results if r["arm"] not in ("full", "base (no training)")}
    assert len(budget) == 1
    budget = budget.pop()
    counter = TokenCounter(str(tiny_model_dir), 96)
    for row in results:
        if row["arm"] in ("full", "base (no training)", "too_small"):
            continue
        assert row["status"] == "fitted" and abs(row["trained_tokens"] - budget) <= 0.02 * budget, row
        selection = ws.table_dir(f"selections/{row['selection']}") / "part-0.parquet"
        assert sum(counter.per_row(pq.read_table(selection)).values()) == row["trained_tokens"]  # the trainer's count
    masked = [r for r in results if r["arm"] in ("qtuning_offline", "eksft_offline")]
    assert masked and all(r["heldout_nll"] is not None for r in masked)
    small = [r for r in results if r["arm"] == "too_small"]
    assert small and all(r["status"] == "cannot_meet_budget" and r.get("heldout_nll") is None for r in small)

    report = (folder / "report.md").read_text()
    assert re.search(r"\| too_small \| 2 \| .* not compared: cannot_meet_budget", report)
    for arm in ("random", "instructdiff", "qtuning_offline", "eksft_offline"):
        values = [r["heldout_nll"] for r in results if r["arm"] == arm]
        line = next(line for line in report.splitlines() if line.startswith(f"| {arm} |"))
        assert f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" in line
        if arm != "random":
            random_nll = {r["seed"]: r["heldout_nll"] for r in results if r["arm"] == "random"}
            diffs = [r["heldout_nll"] - random_nll[r["seed"]] for r in results if r["arm"] == arm]
            assert f"{statistics.mean(diffs):.4f} ± {statistics.stdev(diffs):.4f}" in line
            assert f"{sum(d < 0 for d in diffs)} of 2" in line
    assert (folder / "study.png").stat().st_size > 5000
    from curate.experiments.study.stats import compare
    from curate.store.sql import connect

    assert connect(ws).execute("select count(*) from studies_tiny").fetchall()[0][0] == len(results)
    examples = pq.read_table(folder / "heldout.parquet").to_pylist()  # per held-out example, per arm x seed
    evaluated = [r for r in results if r.get("heldout_nll") is not None]  # the untrained base included
    assert len(examples) == 6 * len(evaluated) and any(r["arm"] == "base (no training)" for r in evaluated)
    for row in evaluated:
        values = [e["answer_nll"] for e in examples if e["arm"] == row["arm"] and e["seed"] == row["seed"]]
        assert len(values) == 6 and statistics.mean(values) == pytest.approx(row["heldout_nll"], abs=1e-9)
    assert connect(ws).execute("select count(distinct example_id) from studies_tiny_heldout").fetchall()[0][0] == 6
    for arm, reference in (("instructdiff", "random"), ("eksft_offline", "full")):
        paired = compare(examples, arm=arm, reference=reference)
        line = next(line for line in report.splitlines() if line.startswith(f"| {arm} | {reference} |"))
        assert f"| {paired.difference:+.4f} | [{paired.low:+.4f}, {paired.high:+.4f}] | {paired.p_value:.4f} |" in line
        assert line.endswith(f"| {paired.verdict} |")
    assert "Planted canaries: none" in report and (folder / "canaries.md").is_file()
    assert json.loads((folder / "runs" / "random" / "seed0" / "result.json").read_text())["fit"].startswith("a random subset")
