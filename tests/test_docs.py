"""The reference generated from the code (docs/commands.md from every --help, docs/recipes.md from the recipe
headers) is never stale: edit the code, then run ``python docs/build.py``."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_generated_docs_are_up_to_date() -> None:
    done = subprocess.run([sys.executable, str(REPO / "docs" / "build.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout


def test_the_readme_links_the_reference_and_shows_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
