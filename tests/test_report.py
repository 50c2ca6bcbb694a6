"""Looking inside: curate show marks exactly the tokens a selection masks; the dataset card of an export parses
and names the recipe hash and the scoring model's fingerprint; the HTML report works in a real headless
Chromium (no console errors, the expected rows and heatmap tokens in the DOM, a screenshot that is not blank)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from curate.stages.ingest import ingest
from curate.stages.recipes import load_recipe
from curate.models.scorer import open_scorer
from curate.stages.score import score
from curate.stages.select import select
from curate.store.workspace import Workspace

# every other response token masked out, the end-of-turn kept: a mask with a known shape
ALTERNATE_SQL = """
select example_id, token_ids, is_response,
    list_transform(generate_series(1, len(is_response)), lambda i:
        case when not is_response[i] then 0 when is_end_of_turn[i] or i % 2 = 0 then 1 else 0 end)::tinyint[] as loss_mask
from token_scores where variant = 'chat'
"""

CHATS = [{"prompt": f"What is {i} squared?", "completion": f"{i} squared is {i * i}.\n#### {i * i}"} for i in range(1, 121)]


@pytest.fixture(scope="module")
def scored(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    folder = tmp_path_factory.mktemp("report")
    ws = Workspace(folder / "ws")
    ingest([str(write_jsonl(folder / "squares.jsonl", CHATS))], workspace=ws, answer_style="hash", progress=False)
    scorer = open_scorer(str(tiny_model_dir), engine="transformers", dtype="float32", top_k=3)
    score(ws, scorer, progress=False)
    recipe = folder / "alternate.sql"
    recipe.write_text(ALTERNATE_SQL)
    select(ws, load_recipe(recipe), name="alternate")
    return ws


def test_show_marks_exactly_the_tokens_the_mask_excludes(scored: Workspace, tiny_model_dir: Path) -> None:
    from rich.console import Console
    from transformers import AutoTokenizer

    from curate.looks.show import MASK_CLOSE, MASK_OPEN, show

    row = pq.read_table(scored.table_dir("selections/alternate") / "part-0.parquet").to_pylist()[3]
    out = io.StringIO()
    shown = show(scored, row["example_id"], selection="alternate", signal="nll", console=Console(file=out, width=400, force_terminal=False))
    text = out.getvalue()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = pq.read_table(scored.table_dir("token_scores")).to_pylist()
    token_row = next(t for t in tokens if t["example_id"] == row["example_id"])
    excluded = [tokenizer.decode([t]) for t, r, m in zip(token_row["token_ids"], token_row["is_response"], row["loss_mask"]) if r and not m]
    assert excluded and re.findall(re.escape(MASK_OPEN) + "(.*?)" + re.escape(MASK_CLOSE), text, re.S) == excluded
    assert sum(shown.masked) == len(excluded) and "\x1b[" not in text  # plain text when not a terminal
    assert "quadrant" in text and "scale:" in text and f"{len(excluded)} response token(s) masked out" in text


def test_the_dataset_card_parses_and_names_the_recipe_and_the_model(scored: Workspace, tiny_model_dir: Path) -> None:
    import yaml

    from curate.stages.export import export
    from curate.stages.select import read_manifest

    folder = export(scored, "alternate", "axolotl", model=str(tiny_model_dir))
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    manifest = read_manifest(pq.read_table(scored.table_dir("selections/alternate") / "part-0.parquet"))
    card = header["curate"]
    assert card["recipe_sql_hash"] == manifest["sql_hash"] and card["rows"] == 120
    model_hash = {t["model_hash"] for t in pq.read_table(scored.table_dir("token_scores"), columns=["model_hash"]).to_pylist()}
    assert [m["fingerprint"] for m in card["score_models"]] == sorted(model_hash)
    labels = pq.read_table(folder / "train.parquet").column("labels").to_pylist()
    assert card["trained_response_tokens"] == sum(1 for row in labels for label in row if label != -100)
    assert header["configs"][0]["data_files"][0]["path"] == "train.parquet" and "`labels`" in text


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0:  # as on CI: install Debian's package
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium, and not root to install it (apt-get install chromium)")
    return found


def browse(chromium: str, url: str, tmp_path: Path, *, screenshot: Path | None = None) -> tuple[str, str]:
    """Load a page in headless Chromium (no network, as on these machines) and return (its DOM after the scripts
    ran, what the browser logged)."""
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000",
             "--window-size=1300,2400"]
    flags += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*flags, url], capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "ERROR" in line.upper().split("CONSOLE")[0])]


@pytest.mark.slow
def test_the_report_works_in_a_real_browser(scored: Workspace, chromium: str, tmp_path: Path) -> None:
    from curate.looks.report import write_report

    path = write_report(scored, "alternate", out=tmp_path / "report.html")
    assert "http://" not in path.read_text().replace("http://www.w3.org/2000/svg", "")  # nothing fetched from anywhere
    rows = pq.read_table(scored.table_dir("selections/alternate") / "part-0.parquet").to_pylist()
    example = rows[57]  # on the second page
    dom, log = browse(chromium, f"file://{path}#example={example['example_id']}", tmp_path)
    assert 'data-ready="yes"' in dom, log[-2000:]
    assert not console_errors(log), console_errors(log)
    body = dom.split('<tbody id="rows">')[1].split("</tbody>")[0]
    assert body.count("<tr data-id=") == 50 and f'data-id="{example["example_id"]}"' in body  # the open example's page
    assert "page 2 of 3 (120 rows)" in dom
    heatmap = dom.split('<div id="heatmap">')[1].split("</div>")[0]
    assert heatmap.count('class="tok') == len(example["input_ids"])
    response = next(t for t in pq.read_table(scored.table_dir("token_scores")).to_pylist() if t["example_id"] == example["example_id"])["is_response"]
    masked = sum(1 for r, m in zip(response, example["loss_mask"]) if r and not m)
    assert masked and heatmap.count('class="tok resp masked"') == masked  # struck through: exactly the masked tokens
    picture = tmp_path / "report.png"
    _, log = browse(chromium, f"file://{path}#example={example['example_id']}", tmp_path, screenshot=picture)
    assert picture.is_file(), log[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(picture))
    assert pixels.std() > 0.05  # not a blank page


@pytest.mark.slow
def test_the_report_pages_through_ten_thousand_examples(tmp_path: Path, chromium: str) -> None:
    import time

    from curate.looks.report import write_report
    from test_recipes import examples, samples

    ws = Workspace(tmp_path / "ws")
    names = [f"e{i:05d}" for i in range(10_000)]
    examples(ws, names)
    samples(ws, [(n, (i % 97) / 50, (i % 89) / 40, 20 + i % 50) for i, n in enumerate(names)])
    select(ws, load_recipe("ppl_band"), name="most", params={"score_key": "k", "fraction": "1.0"})
    path = write_report(ws, "most", out=tmp_path / "big.html")
    started = time.perf_counter()
    dom, log = browse(chromium, f"file://{path}#page=200", tmp_path)
    assert time.perf_counter() - started < 60 and not console_errors(log)
    body = dom.split('<tbody id="rows">')[1].split("</tbody>")[0]
    assert body.count("<tr data-id=") == 50 and "page 200 of 200 (10,000 rows)" in dom  # one page in the DOM, not 10,000 rows
    assert 'data-id="e09999"' in body
