"""SQL recipe files: a header that says what the file is, then plain DuckDB SQL with named parameters.

    -- name: instructdiff
    -- description: ...
    -- grain: one row per selected example
    -- parameters:
    --   base_key: score key of the base model (required: no default)
    --   trim = 0.1: share dropped at each end by ΔNLL
    -- output: example_id, ...

Parameters are bound by DuckDB (``$trim`` in the SQL), never by string formatting. A value given as text
on the command line becomes an integer or a float when it reads as one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).resolve().parents[1] / "sql" / "recipes"
_FIELD = re.compile(r"^--\s*(name|description|grain|output|parameters):\s*(.*)$")
_PARAMETER = re.compile(r"^--\s+([a-z_][a-z0-9_]*)\s*(?:=\s*([^:]+?))?\s*:\s*(.*)$")


@dataclass(frozen=True)
class Parameter:
    name: str
    default: Any  # None: required
    description: str


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    description: str
    grain: str
    output: str
    parameters: dict[str, Parameter] = field(default_factory=dict)
    sql: str = ""

    @property
    def sql_hash(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()[:16]

    def bind(self, given: dict[str, str]) -> dict[str, Any]:
        """Defaults overridden by ``given``; refuses unknown names and missing required values."""
        unknown = sorted(set(given) - set(self.parameters))
        if unknown:
            raise ValueError(f"{self.path.name}: unknown parameter(s) {unknown}; it takes {sorted(self.parameters) or 'none'}")
        values = {name: coerce(given[name]) if name in given else p.default for name, p in self.parameters.items()}
        missing = sorted(name for name, value in values.items() if value is None)
        if missing:
            raise ValueError(f"{self.path.name}: parameter(s) {missing} have no default; pass --param NAME=VALUE")
        used = {name for name in values if re.search(rf"\${name}\b", self.sql)}
        return {name: value for name, value in values.items() if name in used}


def coerce(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip().strip("'\"")


def load_recipe(spec: str | Path) -> Recipe:
    """A recipe by file path, or by name from ``sql/recipes/``."""
    path = Path(spec)
    if not path.is_file():
        path = RECIPE_DIR / f"{spec}.sql"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.sql")))
        raise FileNotFoundError(f"recipe {spec!r} not found: give a .sql file or one of: {known}")
    text = path.read_text(encoding="utf-8")
    header: dict[str, str] = {}
    parameters: dict[str, Parameter] = {}
    in_parameters = False
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        match = _FIELD.match(line)
        if match:
            key, value = match.groups()
            in_parameters = key == "parameters"
            if not in_parameters:
                header[key] = value.strip()
            continue
        parameter = _PARAMETER.match(line) if in_parameters else None
        if parameter:
            name, default, description = parameter.groups()
            parameters[name] = Parameter(name, coerce(default) if default is not None else None, description.strip())
        elif key_continues(line) and not in_parameters and header:
            last = list(header)[-1]
            header[last] += " " + line.lstrip("- ").strip()
    return Recipe(path, header.get("name", path.stem), header.get("description", ""), header.get("grain", ""),
                  header.get("output", ""), parameters, text)


def key_continues(line: str) -> bool:
    return line.startswith("--  ")
