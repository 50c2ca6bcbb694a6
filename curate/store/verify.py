"""``curate verify``: is the workspace whole? Duplicates on each table's grain, orphans, stale temporary files,
parts that do not parse.

Every stage runs ``check_tables`` over the tables it wrote before it returns, so a bug that doubles rows is
caught where it happens, not in a recipe's result. ``verify`` checks everything and can remove the
temporaries a killed writer left behind (``--clean``; never while a writer holds the lock).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from curate.kernel.atomic import is_stale, is_temporary
from curate.kernel.lock import active_holder, holds_lock
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
        lines.append("workspace is whole" if self.ok else "problems found")
        return "\n".join(lines)


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


def check_tables(workspace: Workspace, tables: list[str]) -> None:
    """After a stage: the tables it wrote hold no duplicates or orphans (raises IntegrityError, naming them)."""

    present = workspace.tables()
    con = connect(workspace)
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
    import pyarrow.parquet as pq


    if not workspace.root.is_dir():
        raise FileNotFoundError(f"workspace {workspace.root} does not exist")
    report = VerifyReport()
    temporaries = [p for p in workspace.root.rglob(".*") if is_temporary(p)]
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
        broken = []
        for part in sorted(folder.glob("*.parquet")):
            if part.name.startswith("."):
                continue
            try:
                pq.read_metadata(part)
            except Exception:  # pyarrow raises several types for a damaged file
                broken.append(str(part.relative_to(workspace.root)))
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
