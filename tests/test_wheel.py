"""The package installs: an sdist built from the source tree, a wheel built from that sdist (as ``python -m
build`` does), installed with pip into an empty target and imported from a process whose working directory
is outside the repository, finds every shipped recipe, the prompt templates, the report template and the
bundled study spec, and ``curate recipes`` runs there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
SOURCES = ("pyproject.toml", "README.md", "curate", "train", "sql")  # what a fresh clone has of the package (sql: the link)
RECIPES = sorted(p.stem for p in (REPO / "curate" / "sql" / "recipes").glob("*.sql"))
EXPLORE = sorted(p.name for p in (REPO / "curate" / "sql" / "explore").glob("*.sql"))
TEMPLATES = sorted(p.name for p in (REPO / "curate" / "templates").iterdir() if p.suffix in (".txt", ".html"))

CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import curate
    from curate.experiments.study.spec import BUNDLED_DIR, load_spec
    from curate.looks.report import TEMPLATE
    from curate.stages.prompts import TEMPLATE_DIR, templates_for
    from curate.stages.recipes import RECIPE_DIR, load_recipe

    names = json.loads(sys.argv[1])
    print(json.dumps({
        "curate": curate.__file__,
        "recipes": {name: load_recipe(name).name for name in names},
        "explore": sorted(p.name for p in (RECIPE_DIR.parent / "explore").glob("*.sql")),
        "templates": sorted(p.name for p in TEMPLATE_DIR.iterdir()),
        "answer_only": sorted(templates_for("auto", purpose="answer_only")),
        "cot": sorted(templates_for("auto", purpose="cot")),
        "report": TEMPLATE.read_text()[:15],
        "study": load_spec("gsm8k").name,
        "study_dir": str(BUNDLED_DIR),
    }))
""")


def _python(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{args[:3]}: {done.stderr[-3000:]}"
    return done


def test_the_wheel_carries_the_recipes_templates_and_study(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_symlink():
            (source / name).symlink_to(os.readlink(path))
        elif path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    assert (source / "sql").is_symlink() and (source / "sql" / "recipes").is_dir()

    dist = tmp_path / "dist"
    build = "from setuptools import build_meta as b; import sys; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    sdist = dist / _python(["-c", build, "build_sdist", str(dist)], cwd=source).stdout.split()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    unpacked = next((tmp_path / "unpacked").iterdir())
    wheel = dist / _python(["-c", build, "build_wheel", str(dist)], cwd=unpacked).stdout.split()[-1]

    site = tmp_path / "site"
    _python(["-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), "-q", str(wheel)], cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    found = json.loads(_python(["-c", CHECK, json.dumps(RECIPES)], cwd=elsewhere, env=env).stdout.splitlines()[-1])
    assert Path(found["curate"]).resolve().is_relative_to(site.resolve()), found["curate"]  # the installed copy, not the repo
    assert Path(found["study_dir"]).resolve().is_relative_to(site.resolve())
    assert found["recipes"] == {name: name for name in RECIPES} and len(RECIPES) >= 10
    assert found["explore"] == EXPLORE and EXPLORE
    assert found["templates"] == TEMPLATES
    assert found["answer_only"] == found["cot"] == ["choice", "numeric", "options"]
    assert found["report"].lower().startswith("<!doctype html")
    assert found["study"] == "gsm8k"

    listed = _python(["-m", "curate.cli", "recipes"], cwd=elsewhere, env=env).stdout
    assert [line for line in listed.splitlines() if not line.startswith(" ")] == RECIPES
