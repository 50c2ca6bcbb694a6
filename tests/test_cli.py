"""Every command answers --help with an example, and every command is documented in the README."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from curate.cli import build_parser, main
from train import cli as train_cli

PROGRAMS = {"curate": (build_parser, main), "train": (train_cli.build_parser, train_cli.main)}


def _commands(program: str = "curate") -> list[list[str]]:
    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                        walk(sub, prefix + [name])
                    else:
                        found.append(prefix + [name])

    walk(PROGRAMS[program][0](), [])
    return found


def test_commands_are_found() -> None:
    assert ["ingest"] in _commands() and ["models", "pull"] in _commands() and ["sft"] in _commands("train")


@pytest.mark.parametrize("program", PROGRAMS)
def test_top_level_help_lists_every_command(program: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        PROGRAMS[program][1](["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    assert all(command[0] in listed for command in _commands(program))


@pytest.mark.parametrize("command", [[p, *c] for p in PROGRAMS for c in _commands(p)], ids=" ".join)
def test_help_has_an_example_and_readme_documents_it(command: list[str], capsys) -> None:
    program, *verb = command
    with pytest.raises(SystemExit) as done:
        PROGRAMS[program][1](verb + ["--help"])
    assert done.value.code == 0
    assert "example:" in capsys.readouterr().out
    assert " ".join(command) in (REPO / "docs" / "commands.md").read_text()


def test_cli_ingest_prints_counts(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Q?", "completion": "A."}, "not json"])
    assert main(["ingest", str(path), "-w", str(tmp_path / "ws"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "examples added" in out and "malformed_json" in out and "rejects" in out
    manifests = list((tmp_path / "ws" / "manifests").glob("ingest-*.json"))
    assert json.loads(manifests[0].read_text())["report"]["added"] == 1


def test_cli_reports_bad_options(tmp_path: Path, capsys) -> None:
    assert main(["ingest", "gsm8k", "-w", str(tmp_path), "--map", "question"]) == 1
    assert "--map expects SOURCE=TARGET" in capsys.readouterr().err
    assert main(["ingest", "nothing-here", "-w", str(tmp_path)]) == 1
    assert "neither a file, a directory, nor a built-in source" in capsys.readouterr().err


def test_cli_select_with_params_and_export(tmp_path: Path, capsys) -> None:
    from test_recipes import examples, samples
    from curate.store.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    names = [f"e{i:02d}" for i in range(1, 7)]
    examples(ws, names)
    samples(ws, [(n, 0.1 * i, 1.0, 10) for i, n in enumerate(names, start=1)], key="0123456789012345")
    assert main(["select", "ppl_band", "-w", str(ws.root), "--param", "score_key=0123456789012345", "--param", "band=max",
                 "--param", "fraction=0.5", "--name", "hard"]) == 0
    assert "rows                        3" in capsys.readouterr().out
    assert main(["select", "ppl_band", "-w", str(ws.root), "--param", "fraction=lots", "--param", "score_key=x"]) == 1
    assert "parameter fraction expects a number, got 'lots'" in capsys.readouterr().err
    assert main(["select", "ppl_band", "-w", str(ws.root), "--param", "score_key=smollm2"]) == 1
    assert "score_key = 'smollm2': no finished score run matches it" in capsys.readouterr().err
    assert main(["export", "hard", "-w", str(ws.root), "--format", "jsonl"]) == 0
    out = (ws.root / "exports" / "hard" / "jsonl" / "train.jsonl").read_text().splitlines()
    assert len(out) == 3 and "exported selection hard as jsonl" in capsys.readouterr().out


def test_concurrent_model_pulls_take_turns(tmp_path: Path, monkeypatch) -> None:
    import threading
    import time as clock

    from curate.models import registry

    monkeypatch.setenv("CURATE_MODELS", str(tmp_path / "cache"))
    conversions = []

    def slow_convert(gguf, out):  # stands in for the GGUF conversion: slow, writes a checkpoint
        conversions.append(out)
        clock.sleep(0.5)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(registry, "_convert_gguf", slow_convert)
    monkeypatch.setattr(registry, "_check_loads", lambda directory: None)
    bundled = registry.BundledModel("smollm2", "a stand-in", lambda: Path(__file__))  # any existing file as the GGUF
    monkeypatch.setitem(registry.BUNDLED_MODELS, "smollm2", bundled)
    results, errors = [], []

    def pull() -> None:
        try:
            results.append(registry.pull("smollm2"))
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1 and len(conversions) == 1  # one converted, the others waited and reused it
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".smollm2.lock", "smollm2"]
