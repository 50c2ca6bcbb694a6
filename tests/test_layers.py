"""The house has layers you can see: the import graph, read from the code, runs only downwards.

kernel imports nothing of ours; store and models import only kernel (and their own folder); stages import
store, models and kernel; looks and experiments sit above the stages; only experiments (and the CLI) import
``train``; ``train`` imports only ``curate.kernel``. Our own modules import each other at module level: a
function-local import of one of ours must say why on its line or the line above (a lazy heavy dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# layer -> the layers it may import (its own included)
ALLOWED = {
    "kernel": {"kernel"},
    "store": {"store", "kernel"},
    "models": {"models", "kernel"},
    "stages": {"stages", "store", "models", "kernel"},
    "looks": {"looks", "stages", "store", "models", "kernel"},
    "experiments": {"experiments", "looks", "stages", "store", "models", "kernel", "train"},
    "cli": {"cli", "experiments", "looks", "stages", "store", "models", "kernel", "train", "root"},
    "root": set(),
    "train": {"train", "kernel"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("curate", "train"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "train":
        return "train"
    if len(parts) == 1:
        return "root"
    return "cli" if parts[1] == "cli" else parts[1]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, inside a function) for every import of curate or train in the file."""
    tree = ast.parse(path.read_text())
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local |= {id(sub) for sub in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] in ("curate", "train"):
                found.append((name, node.lineno, id(node) in local))
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_import_runs_downwards() -> None:
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        for name, line, _ in _imports(path):
            target = _resolve(name, modules)
            if target is None or target == module or target in ("curate", "train") and name.count(".") == 0:
                continue
            if _layer(target) == "root":
                continue
            if _layer(target) not in ALLOWED[_layer(module)]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not wrong, "imports that run against the layers:\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle() -> None:
    modules = _modules()
    graph = {m: {t for n, _, _ in _imports(p) if (t := _resolve(n, modules)) and t != m and t not in ("curate", "train")}
             for m, p in modules.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, trail + [node]):
                return True
        state[node] = 2
        return False

    assert not any(state.get(m) is None and visit(m, []) for m in sorted(graph)), " -> ".join(cycle)


def test_our_modules_are_imported_at_module_level_unless_a_comment_says_why() -> None:
    hidden = []
    for module, path in _modules().items():
        lines = path.read_text().splitlines()
        for name, line, inside in _imports(path):
            said = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            if inside and not said:
                hidden.append(f"{path.relative_to(REPO)}:{line} imports {name} inside a function")
    assert not hidden, "\n".join(hidden)
