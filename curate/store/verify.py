"""``curate verify``: is the workspace whole? Duplicates on each table's grain, orphans, stale temporary files,
parts that do not parse.

Every stage runs ``check_tables`` over the tables it wrote before it returns, so a bug that doubles rows is
caught where it happens, not in a recipe's result. ``verify`` checks everything and can remove the
temporaries a killed writer left behind (``--clean``; never while a writer holds the lock).

``--repair`` (``repair``) moves the parts that do not parse and the temporaries a dead writer left into
``WS/.curate/quarantine/<time>/`` (nothing is deleted; ``repair.json`` there lists the moves), and says which
stage re-run restores what each held: every stage skips what it finds present, so re-running it adds back
exactly the missing rows (ingest re-adds the lost examples and rejects, score re-scores the lost examples and
rebuilds sample_scores, select writes its selection again). A command that meets an unreadable part says to
run it (``damage_advice``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.kernel.atomic import is_stale, is_temporary, write_atomic_text
from curate.kernel.lock import active_holder, holds_lock
from curate.kernel.runs import RUNS_TABLE
from curate.store.sql import connect
from curate.store.workspace import Workspace

# the columns that identify one row of each table (selections: one row per example)
GRAINS: dict[str, tuple[str, ...]] = {
    "examples": ("example_id",),
    "rejects": ("reject_id",),
    "token_scores": ("example_id", "score_key", "variant"),
    "pair_scores": ("example_id", "pair_key"),
    "sample_scores": ("example_id", "score_key"),
    "probe_scores": ("example_id", "probe_key"),
    "traces": ("trace_id",),
    "best_traces": ("example_id", "gen_key", "rule", "student_key"),
    "runs": ("run_id",),
}
SELECTION_GRAIN = ("example_id",)

# rows that point at something that is not there: table -> (what, SQL returning the offending keys)
ORPHANS: dict[str, list[tuple[str, str]]] = {
    table: [("example_id not in examples", f"select distinct example_id from {table} anti join examples using (example_id)")]
    for table in ("token_scores", "pair_scores", "sample_scores", "probe_scores", "traces")
}
ORPHANS["pair_scores"].append(("base or calibrated score key without token_scores rows", """
    select distinct pair_key from pair_scores p
    where not exists (select 1 from token_scores t where t.score_key = p.base_key and t.example_id = p.example_id)
       or not exists (select 1 from token_scores t where t.score_key = p.calibrated_key and t.example_id = p.example_id)"""))
ORPHANS["best_traces"] = [("trace_id not in traces", "select distinct trace_id from best_traces anti join traces using (trace_id)")]


class IntegrityError(RuntimeError):
    """A stage found duplicated or orphaned rows in a table it wrote."""


@dataclass
class VerifyReport:
    tables: dict[str, int] = field(default_factory=dict)  # table -> rows
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    orphans: dict[str, list[str]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)  # left by writers that died
    in_progress: list[str] = field(default_factory=list)  # of writers still running
    writer: dict | None = None  # the process writing now, if any
    quarantined: list[str] = field(default_factory=list)  # what --repair moved (relative paths, as they were)
    quarantine: str | None = None  # where it went
    restores: dict[str, list[str]] = field(default_factory=dict)  # table -> what restores its quarantined rows

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.orphans or self.unreadable or self.temporaries)

    def summary(self) -> str:
        lines = [f"{name:<28}{rows:>12,} rows" for name, rows in sorted(self.tables.items())]
        for title, found in (("duplicates", self.duplicates), ("orphans", self.orphans)):
            for table, problems in sorted(found.items()):
                lines += [f"{title}: {table}: {problem}" for problem in problems]
        lines += [f"unreadable part: {path}" for path in self.unreadable]
        lines += [f"temporary (stale: left by a writer that died; curate verify --clean removes it): {path}" for path in self.temporaries]
        lines += [f"temporary (a write in progress): {path}" for path in self.in_progress]
        if self.writer:
            lines.append(f"being written now by pid {self.writer.get('pid')} ({self.writer.get('command')})")
        if self.unreadable:
            lines.append("curate verify --repair moves the unreadable parts aside and says which re-run restores their rows")
        if self.quarantined:
            lines.append(f"moved into {self.quarantine} (nothing deleted):")
            lines += [f"  {path}" for path in self.quarantined]
            for table, steps in sorted(self.restores.items()):
                lines.append(f"to restore {table}:")
                lines += [f"  {step}" for step in steps]
        if self.ok:
            lines.append("workspace is whole" + (" (the re-runs listed bring back the rows that were moved)" if self.quarantined else ""))
        elif self.quarantined and self.ok_but_orphans:
            lines.append("repaired: the orphans above are rows whose examples were moved; the re-runs listed restore them")
        else:
            lines.append("problems found")
        return "\n".join(lines)

    @property
    def ok_but_orphans(self) -> bool:
        """Whole but for orphans: what a repair leaves until the stages are re-run (rows whose examples it moved)."""
        return not (self.duplicates or self.unreadable or self.temporaries)


def grain_of(table: str) -> tuple[str, ...] | None:
    return SELECTION_GRAIN if table.startswith("selections_") else GRAINS.get(table)


def _duplicates(con, table: str, grain: tuple[str, ...]) -> list[str]:
    columns = ", ".join(grain)
    rows = con.execute(f"select {columns}, count(*) as n from {table} group by all having count(*) > 1 order by n desc limit 6").fetchall()
    if not rows:
        return []
    total = con.execute(f"select count(*) from (select {columns} from {table} group by all having count(*) > 1)").fetchall()[0][0]
    examples = "; ".join(", ".join(f"{c}={v}" for c, v in zip(grain, row[:-1])) + f" ({row[-1]}x)" for row in rows[:5])
    return [f"{total:,} {'/'.join(grain)} value(s) on more than one row, e.g. {examples}"]


def _orphans(con, table: str, present: set[str]) -> list[str]:
    found = []
    for what, query in ORPHANS.get(table, []):
        needs = {"examples"} if "examples" in query else set()
        needs |= {t for t in ("traces", "token_scores") if f"from {t}" in query or f"join {t}" in query} - {table}
        if not needs <= present:
            continue
        keys = [r[0] for r in con.execute(query).fetchall()]
        if keys:
            found.append(f"{len(keys):,} {what}, e.g. {', '.join(map(str, keys[:5]))}")
    return found


def check_tables(workspace: Workspace, tables: list[str], *, connection: Any = None) -> None:
    """After a stage: the tables it wrote hold no duplicates or orphans (raises IntegrityError, naming them).
    ``connection``: the stage run's own DuckDB connection (its views made anew here), else a new one."""
    present = workspace.tables()
    con = connect(workspace, into=connection)
    problems = []
    for table in tables:
        grain = grain_of(table)
        if table not in present or grain is None:
            continue
        problems += [f"{table}: {p}" for p in _duplicates(con, table, grain) + _orphans(con, table, set(present))]
    if problems:
        raise IntegrityError("the workspace check after this stage failed:\n  " + "\n  ".join(problems)
                             + f"\nrun `curate verify --workspace {workspace.root}` for the whole picture")


def verify(workspace: Workspace, *, clean: bool = False) -> VerifyReport:
    """Check every table; with ``clean``, remove stale temporaries (only when nobody is writing)."""
    if not workspace.root.is_dir():
        raise FileNotFoundError(f"workspace {workspace.root} does not exist")
    report = VerifyReport()
    quarantine = workspace.root / QUARANTINE
    temporaries = [p for p in workspace.root.rglob(".*") if is_temporary(p) and quarantine not in p.parents]
    report.temporaries = sorted(str(p.relative_to(workspace.root)) for p in temporaries if is_stale(p))
    report.in_progress = sorted(str(p.relative_to(workspace.root)) for p in temporaries if not is_stale(p))
    report.writer = None if holds_lock(workspace.root) else active_holder(workspace.root)
    if clean and report.temporaries:
        for relative in report.temporaries:  # their writers are gone: nobody can be using them
            path = workspace.root / relative
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        report.temporaries = []
    tables = workspace.tables()
    readable = {}
    for name, folder in tables.items():
        broken = _unreadable(folder, workspace.root)
        report.unreadable += broken
        if not broken:
            readable[name] = folder
    con = connect(workspace, tables=readable)
    for name in readable:
        report.tables[name] = con.execute(f'select count(*) from "{name}"').fetchall()[0][0]
        grain = grain_of(name)
        if grain:
            duplicates = _duplicates(con, f'"{name}"', grain)
            if duplicates:
                report.duplicates[name] = duplicates
        orphans = _orphans(con, name, set(readable))
        if orphans:
            report.orphans[name] = orphans
    return report


QUARANTINE = Path(".curate") / "quarantine"

# table -> the stage whose re-run restores its rows, and how
RESTORES = {
    "examples": ("ingest", "re-ingest the same sources with the same options (it adds back only the examples not present)"),
    "rejects": ("ingest", "re-ingest the same sources (the rejected rows are found again)"),
    "token_scores": ("score", "re-run the scoring (only the examples without rows are scored again; sample_scores is rebuilt)"),
    "sample_scores": ("score", "re-run the scoring (nothing is scored again: sample_scores is rebuilt from token_scores)"),
    "pair_scores": ("pair", "re-run the pair scoring (only the examples without rows)"),
    "probe_scores": ("probe", "re-run the probe (only the examples without rows)"),
    "traces": ("generate", "re-run the generation (only the requests without traces; best-of-n is chosen again)"),
    "best_traces": ("generate", "re-run the generation (nothing is generated again: best-of-n is chosen again at its end)"),
}


def _unreadable(folder: Path, root: Path) -> list[str]:
    """The parts of one table folder whose Parquet footer does not parse (relative to the workspace)."""
    import pyarrow.parquet as pq

    broken = []
    for part in sorted(folder.glob("*.parquet")):
        if part.name.startswith("."):
            continue
        try:
            pq.read_metadata(part)
        except Exception:  # pyarrow raises several types for a damaged file
            broken.append(str(part.relative_to(root)))
    return broken


def unreadable_parts(workspace: Workspace) -> list[str]:
    """Every part in the workspace that does not parse (a footer read each: cheap)."""
    return [path for folder in workspace.tables().values() for path in _unreadable(folder, workspace.root)]


def damage_advice(workspace: Workspace) -> str | None:
    """What to tell a user whose command met a damaged workspace (None when every part parses)."""
    if not workspace.root.is_dir():
        return None
    broken = unreadable_parts(workspace)
    if not broken:
        return None
    shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
    return (f"{len(broken)} part(s) of the workspace are unreadable (damaged on disk: {shown}). Run `curate verify "
            f"--workspace {workspace.root} --repair`: it moves them into {workspace.root / QUARANTINE} and says which "
            "stage re-run restores their rows")


def repair(workspace: Workspace) -> VerifyReport:
    """Move unreadable parts and stale temporaries into the quarantine, then check again; the report says which
    re-run restores each table (taken from the run records and the selections' manifests)."""
    with workspace.writing("curate verify --repair"):  # nobody writes while parts move
        found = verify(workspace)
        moving = found.unreadable + found.temporaries
        folder = workspace.root / QUARANTINE / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        moves = []
        for relative in moving:
            source = workspace.root / relative
            # a temporary keeps its name without the leading dot: in the quarantine it is no writer's temporary
            target = folder / Path(relative).parent / source.name.lstrip(".")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
            moves.append({"from": relative, "to": str(target.relative_to(workspace.root))})
        report = verify(workspace)
        report.quarantined = moving
        if moving:
            report.quarantine = str(folder)
            broken_tables = sorted({_table_of(workspace, relative) for relative in found.unreadable} - {None})
            report.restores = {table: _restore(workspace, table) for table in broken_tables}
            write_atomic_text(folder / "repair.json", json.dumps({"moved": moves, "restores": report.restores}, indent=2) + "\n")
    return report


def _table_of(workspace: Workspace, relative: str) -> str | None:
    folder = (workspace.root / relative).parent
    parts = folder.relative_to(workspace.root).parts
    return "_".join(parts) if parts else None


def _restore(workspace: Workspace, table: str) -> list[str]:
    """The re-run that restores a table's quarantined rows: the recorded commands of that stage's finished runs."""
    if table == RUNS_TABLE:
        return ["nothing to re-run: the record of a run is lost, the rows it made are intact (`curate runs` lists the rest)"]
    if table.startswith("selections_"):
        return [_select_command(workspace, table.removeprefix("selections_"))]
    if table not in RESTORES:
        return [f"re-run the command that wrote {table}"]
    stage, how = RESTORES[table]
    stages = ("score", "pair") if stage == "score" else (stage,)
    commands = list(dict.fromkeys(_command(r["command"]) for r in _finished_runs(workspace) if r["stage"] in stages and r["command"]))
    return [f"{how}; the {' and '.join(stages)} runs recorded here:"] + [f"  {c}" for c in commands[:6]] if commands else [how]


def _finished_runs(workspace: Workspace) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    parts = workspace.parts(RUNS_TABLE)
    if not parts:
        return []
    rows = pq.read_table([str(p) for p in parts], columns=["stage", "status", "command", "started_at"]).to_pylist()
    return sorted((r for r in rows if r["status"] == "finished"), key=lambda r: r["started_at"])


def _command(recorded: str) -> str:
    """A recorded command line as a user types it (the program's path shortened to ``curate``)."""
    words = recorded.split(" ")
    if words and os.path.basename(words[0]) in ("curate", "cli.py", "__main__.py"):
        words[0] = "curate"
    return " ".join(words)


def _select_command(workspace: Workspace, name: str) -> str:
    manifest_file = workspace.table_dir(f"selections/{name}") / "manifest.json"
    if not manifest_file.is_file():
        return f"re-run `curate select RECIPE --name {name}` as it was made"
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("subset"):
        return f"re-run the study that made it (`curate study`): {name} is a study's subset ({manifest['subset']})"
    path = Path(manifest.get("recipe_path") or manifest["recipe"])
    recipe = manifest["recipe"] if path.parent.name == "recipes" and path.parent.parent.name == "sql" else str(path)
    params = [f"--param {shlex.quote(f'{k}={v}')}" for k, v in sorted((manifest.get("parameters") or {}).items())]
    return " ".join(["curate select", shlex.quote(recipe), "--workspace", shlex.quote(str(workspace.root)), "--name", name, *params])
