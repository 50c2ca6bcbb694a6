"""The trainers' own loading code on exports of a real selection (issue 23): LLaMA-Factory's get_dataset
(dataset_info.json, its ShareGPT aligner and supervised processor, the `smollm2` template of the bundled
model), and axolotl's config and dataset loading with its packing sampler and collator (sample_packing on and
off). TRL is tested in tests/test_export.py, datasets.load_dataset by folder and by files there too.

Each tool runs in its own process, from its own folder of pinned packages installed `--no-deps` (what `pip
install <tool>==<version>` resolves to for the packages its data code imports; see PINS) into
.cache/loaders/<tool>-<version>, first on sys.path before the project's venv: the first run installs them
(PyPI, ~150 MB each), later runs reuse them. LLaMA-Factory imports torchaudio at load time and PyPI has no
torchaudio for torch 2.13, so its compiled parts are moved aside: the text-only data path never calls them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from conftest import REPO
from curate.kernel.atomic import staged_directory, write_atomic_text
from curate.kernel.chat_tokens import render
from curate.stages.export import export
from test_export import build_workspace, selection_rows

pytestmark = pytest.mark.slow

LOADERS = Path(__file__).parent / "loaders"
# each tool at the version tested, with the versions its own pins (or, unpinned, PyPI today) give the packages
# its data code imports; everything else (torch, numpy, pyarrow, pandas, ...) comes from the project's venv
PINS = {
    "llamafactory": ("0.9.5", ["llamafactory==0.9.5", "transformers==5.6.0", "tokenizers==0.22.2", "huggingface_hub==1.33.0",
                               "datasets==4.0.0", "fsspec==2025.3.0", "accelerate==1.11.0", "peft==0.18.1", "trl==0.24.0",
                               "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3", "torchaudio==2.11.1"]),
    "axolotl": ("0.19.0", ["axolotl==0.19.0", "transformers==5.16.1", "tokenizers==0.23.1", "huggingface_hub==1.17.0",
                           "datasets==4.8.4", "accelerate==1.13.0", "peft==0.20.0", "trl==1.9.0", "addict==2.4.0",
                           "colorama==0.4.6", "termcolor==3.3.0", "posthog==6.7.11", "backoff==2.2.1", "distro==1.9.0", "six==1.17.0"]),
}


def install(tool: str) -> Path:
    """The tool's folder of pinned packages, installed on first use (pip --target, --no-deps)."""
    version, packages = PINS[tool]
    folder = REPO / ".cache" / "loaders" / f"{tool}-{version}"
    marker = folder / "pins.json"
    if marker.is_file() and json.loads(marker.read_text()) == packages:
        return folder
    with staged_directory(folder) as staging:
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(staging), *packages]
        done = subprocess.run(pip, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            pytest.fail(f"installing {tool} {version} failed (PyPI reachable?): {done.stderr[-2000:]}")
        compiled = staging / "torchaudio" / "lib"
        if compiled.is_dir():  # built for another torch: importable as pure Python only (the text path never calls it)
            aside = staging / "torchaudio-compiled-aside"
            aside.mkdir()
            for library in compiled.glob("*.so"):
                library.rename(aside / library.name)
        write_atomic_text(staging / "pins.json", json.dumps(packages) + "\n")
    return folder


def run_tool(tool: str, script: str, *args: str, cwd: Path) -> dict[str, Any]:
    """Run one of tests/loaders/*.py with the tool's folder first on sys.path; its JSON result."""
    result = cwd.parent / f"{tool}-{cwd.name}-result.json"
    env = {**os.environ, "PYTHONPATH": str(install(tool)), "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(LOADERS / script), *args, str(result)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{tool} failed on {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(result.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    tmp = tmp_path_factory.mktemp("loaders")
    return build_workspace(tmp, tiny_model_dir), tiny_model_dir, tmp


def replies(messages: list[dict[str, str]], end: str) -> str:
    return "".join(m["content"] + end for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("name", ["nosystem", "sharegpt"])
def test_llamafactory_get_dataset_loads_every_row_of_our_export(loaded, name: str) -> None:
    """Failure 1 of issue 23 (on the old code `nosystem` stops in LLaMA-Factory's converter with KeyError: 'system');
    every row comes out with the text our chat template renders, and trains on exactly the assistant replies."""
    from transformers import AutoTokenizer

    ws, model, tmp = loaded
    folder = export(ws, name, "llamafactory", out=tmp / f"lf-{name}")
    got = run_tool("llamafactory", "llamafactory_load.py", str(model), str(folder), name, str(tmp / f"lf-out-{name}"), cwd=folder)
    assert got["versions"] == {"llamafactory": "0.9.5", "transformers": "5.6.0", "datasets": "4.0.0"}
    rows = selection_rows(ws, name)
    assert len(got["rows"]) == len(rows) == json.loads((folder / "export.json").read_text())["rows"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    # LLaMA-Factory's smollm2 template writes the same text as SmolLM2's own, but for a conversation without a
    # system prompt its default one ends with a period where SmolLM2's has none (docs/exports.md)
    assert got["default_system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
    for row, out in zip(rows, got["rows"]):  # same order
        messages = row["messages"]
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": got["default_system"]}, *messages]
        assert tokenizer.decode(out["input_ids"], clean_up_tokenization_spaces=False) == render(tokenizer, messages)
        trained = tokenizer.decode([t for t in out["labels"] if t != -100], clean_up_tokenization_spaces=False)
        assert trained == replies(row["messages"], "<|im_end|>\n")  # LLaMA-Factory also trains the newline after it
    print(f"\nTABLE llamafactory | 0.9.5 | llamafactory ({name}) | {len(got['rows'])} / {len(rows)} | off")


@pytest.mark.parametrize("name", ["masked", "whole"])
def test_axolotl_loads_our_export_and_packs_it(loaded, name: str) -> None:
    """Failure 3 of issue 23 (on the old code the string example_id column reaches the packing collator: ValueError:
    zero-dimensional arrays cannot be concatenated; and axolotl.yml's absolute path breaks when the folder moves):
    the export, moved away from where it was written, loads from its own folder with sample_packing on and off,
    every row once, with our labels."""
    ws, model, tmp = loaded
    written = export(ws, name, "axolotl", model=str(model), out=tmp / f"ax-{name}-written")
    folder = tmp / f"ax-{name}"
    shutil.move(str(written), folder)
    work = tmp / f"ax-work-{name}"
    work.mkdir()
    got = run_tool("axolotl", "axolotl_load.py", str(model), str(work), cwd=folder)
    assert got["versions"] == {"axolotl": "0.19.0", "transformers": "5.16.1", "datasets": "4.8.4"}
    train = pq.read_table(folder / "train.parquet").to_pylist()
    trained = sum(1 for r in train for label in r["labels"] if label != -100)
    for run in got["runs"]:
        assert run["rows"] == len(train) and run["sequences_in_batches"] == len(train), run["packing"]
        assert run["trained_tokens_in_batches"] == trained, run["packing"]  # the collators keep our labels, nothing added
        assert sorted(map(tuple, run["input_ids"])) == sorted(tuple(r["input_ids"]) for r in train)
        assert sorted(map(tuple, run["labels"])) == sorted(tuple(r["labels"]) for r in train)
        assert {"input_ids", "attention_mask", "labels"} <= set(run["columns"]) and "example_id" not in run["columns"]
        packing = "on" if run["packing"] else "off"
        print(f"\nTABLE axolotl | 0.19.0 | axolotl ({name}) | {run['rows']} / {len(train)} | {packing} ({run['batches']} batches)")
