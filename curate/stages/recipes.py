"""SQL recipe files: a header that says what the file is, then plain DuckDB SQL with named parameters.

    -- name: instructdiff
    -- description: ...
    -- grain: one row per selected example
    -- parameters:
    --   base_key (score_run): the base model's scoring run (required: no default)
    --   trim (float) = 0.1: share dropped at each end by ΔNLL
    -- audits: duplicate_example_id, unknown_example_id, mask_length_differs   (optional: default all)
    -- needs: scores, entropy   (every signal it reads; see NEEDS)
    -- output: example_id, ...

Parameters are bound by DuckDB (``$trim`` in the SQL), never by string formatting, with the type the header
declares: ``text``, ``int``, ``float``, ``bool``, or a run reference (``score_run``, ``pair_run``,
``probe_run``, ``generate_run``), which stays text: a run key as printed, or a readable reference (a model
alias or path: that model's latest finished run) that ``curate.store.run_refs`` turns into the key. A parameter
without a declared type is ``int`` or ``float`` when its default reads as one, else ``text``: a value given on
the command line is never guessed into a number (a run key such as ``1234e567`` stays text).

``needs`` names every signal the recipe reads, from ``NEEDS``; ``curate select`` refuses a run that lacks one
(an IFD recipe on a run scored without ``--ifd``), and a study prepares them (or refuses its spec first).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

RECIPE_DIR = Path(__file__).resolve().parents[1] / "sql" / "recipes"  # package data; the top-level sql/ links here
_FIELD = re.compile(r"^--\s*(name|description|grain|output|parameters|audits|needs):\s*(.*)$")
_PARAMETER = re.compile(r"^--\s+([a-z_][a-z0-9_]*)\s*(?:\(([a-z_]+)\))?\s*(?:=\s*([^:]+?))?\s*:\s*(.*)$")
RUN_TYPES = ("score_run", "pair_run", "probe_run", "generate_run")
TYPES = ("text", "int", "float", "bool", *RUN_TYPES)
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")

Resolver = Callable[[str, str, str], str]  # (run type, parameter name, reference) -> run key

# what a recipe may read, and the step that makes it (a recipe header's `needs:` names them)
NEEDS = {
    "scores": "a scoring run (sample_scores, token_scores: log-probs and token counts): `curate score --model M`",
    "entropy": "full-vocabulary entropy: a run scored in-process (`curate score --model M`), not through a server's prompt log-probs",
    "ifd": "IFD (the reply scored without its instruction too): `curate score --model M --ifd`",
    "calibrated": "a calibrated model's scoring run beside the base model's: `curate score --pair BASE CALIBRATED`",
    "kl": "pair scores (KL between a base and a calibrated model): `curate score --pair BASE CALIBRATED`",
    "probe": "the answer-entropy probe: `curate probe --model M`",
    "traces": "teacher traces and their best-of-n choice (best_traces): `curate generate --teacher T --from ...`",
}


class ParameterError(ValueError):
    pass


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # one of TYPES
    default: Any  # None: required
    description: str

    def convert(self, text: str, recipe: str) -> Any:
        """The value of this parameter from its text, by its declared type (an error names the fix)."""
        value = text.strip()
        try:
            if self.kind == "int":
                return int(value)
            if self.kind == "float":
                return float(value)
        except ValueError:
            raise ParameterError(f"{recipe}: parameter {self.name} expects {'an integer' if self.kind == 'int' else 'a number'}, "
                                 f"got {text!r}; pass --param {self.name}=VALUE") from None
        if self.kind == "bool":
            if value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise ParameterError(f"{recipe}: parameter {self.name} expects true or false, got {text!r}")
        return value.strip("'\"")


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    description: str
    grain: str
    output: str
    parameters: dict[str, Parameter] = field(default_factory=dict)
    sql: str = ""
    audits: tuple[str, ...] | None = None  # the audits its header declares (None: all of them)
    needs: tuple[str, ...] = ()  # every signal it reads (names from NEEDS)

    @property
    def sql_hash(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()[:16]

    def bind(self, given: dict[str, str], resolve: Resolver | None = None) -> dict[str, Any]:
        """Defaults overridden by ``given``, each converted by its declared type; run references resolved to
        keys by ``resolve``. Refuses unknown names, missing required values and values of the wrong type."""
        unknown = sorted(set(given) - set(self.parameters))
        if unknown:
            raise ParameterError(f"{self.path.name}: unknown parameter(s) {unknown}; it takes {sorted(self.parameters) or 'none'}")
        missing = sorted(name for name, p in self.parameters.items() if p.default is None and name not in given)
        if missing:
            raise ParameterError(f"{self.path.name}: parameter(s) {missing} have no default; pass --param NAME=VALUE")
        values = {name: p.convert(given[name], self.path.name) if name in given else p.default for name, p in self.parameters.items()}
        if resolve is not None:  # after every value has its type: a typo in a number is reported first
            values |= {name: resolve(p.kind, name, values[name]) for name, p in self.parameters.items() if p.kind in RUN_TYPES}
        used = {name for name in values if re.search(rf"\${name}\b", self.sql)}
        return {name: value for name, value in values.items() if name in used}


def _kind_of_default(default: str | None) -> str:
    """The type of an undeclared parameter (an older header): what its default reads as, else text."""
    for kind, parse in (("int", int), ("float", float)):
        try:
            if default is not None:
                parse(default)
                return kind
        except ValueError:
            continue
    return "text"


def _parameter(name: str, kind: str | None, default: str | None, description: str, recipe: str) -> Parameter:
    kind = kind or _kind_of_default(default)
    if kind not in TYPES:
        raise ParameterError(f"{recipe}: parameter {name} has unknown type ({kind}); types: {', '.join(TYPES)}")
    typed = Parameter(name, kind, None, description)
    return Parameter(name, kind, typed.convert(default, recipe) if default is not None else None, description)


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
            name, kind, default, description = parameter.groups()
            parameters[name] = _parameter(name, kind, default, description.strip(), path.name)
        elif key_continues(line) and not in_parameters and header:
            last = list(header)[-1]
            header[last] += " " + line.lstrip("- ").strip()
    audits = tuple(a.strip() for a in header["audits"].split(",") if a.strip()) if "audits" in header else None
    needs = tuple(a.strip() for a in header.get("needs", "").split(",") if a.strip())
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ParameterError(f"{path.name}: unknown need(s) {unknown} in its header; a recipe needs any of: {', '.join(NEEDS)}")
    return Recipe(path, header.get("name", path.stem), header.get("description", ""), header.get("grain", ""),
                  header.get("output", ""), parameters, text, audits, needs)


def key_continues(line: str) -> bool:
    return line.startswith("--  ")
