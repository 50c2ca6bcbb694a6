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


@pytest.mark.parametrize("command", [[p, *c] for p in PROGRAMS for c in _commands(p)], ids=" ".join)
def test_help_has_an_example_and_readme_documents_it(command: list[str], capsys) -> None:
    program, *verb = command
    with pytest.raises(SystemExit) as done:
        PROGRAMS[program][1](verb + ["--help"])
    assert done.value.code == 0
    assert "example:" in capsys.readouterr().out
    assert " ".join(command) in (REPO / "README.md").read_text()


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
