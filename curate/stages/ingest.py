"""``curate ingest``: source files → the canonical ``examples`` table, bad rows → ``rejects``.

Each good record becomes one row keyed by the content hash of its messages, so exact duplicates collapse
(and are counted) and re-ingesting the same files adds nothing. Each bad record becomes one ``rejects`` row
naming its file, line/row and reason; it never stops the run.

An ingest is all or nothing: its parts are written to a hidden staging folder and moved into the tables at
the end, so a killed ingest leaves nothing a later command reads, and a re-run does the whole of it. An
example that is already in the workspace with another split or reference answer (it was ingested with
other ``--split``, ``--heldout-fraction``, ``--extract-answer`` or ``--answer-field`` values) refuses the
ingest, an error naming those examples, with nothing written: a split must never change under scores and
selections made from it.

Splits: by default each example's split is drawn from its id (``--heldout-fraction``: that share goes to
``heldout``, the same on every machine); ``--split heldout`` (or ``pool``) puts every row of the files in that
split, so a separate evaluation file can be declared held-out as it is.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tqdm import tqdm

from curate.kernel.answers import extract_answer
from curate.kernel.atomic import temporary_name
from curate.kernel.keys import run_key
from curate.kernel.runs import recorded_run
from curate.models.bundled import BUILTIN_SOURCES, BuiltinSource
from curate.stages.readers import SUFFIXES, BadRow, iter_rows, shorten
from curate.stages.records import (
    RecordError,
    apply_column_map,
    detect_format,
    example_id,
    to_messages,
    unused_fields,
)
from curate.store import schema
from curate.store.verify import check_tables
from curate.store.workspace import (
    PART_SUFFIX,
    Workspace,
    rows_to_table,
    write_atomic_parquet,
)

PART_ROWS = 50_000  # rows per Parquet part: bounds memory on large inputs
SPLITS = ("pool", "heldout")
DEFAULT_MAX_ROW_BYTES = 1 << 20


@dataclass
class IngestReport:
    rows_read: int = 0
    added: int = 0
    duplicates_in_input: int = 0
    already_present: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    without_reference_answer: int = 0
    splits: Counter[str] = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "added": self.added,
            "duplicates_in_input": self.duplicates_in_input,
            "already_present": self.already_present,
            "rejected": dict(sorted(self.rejected.items())),
            "without_reference_answer": self.without_reference_answer,
            "added_per_split": dict(sorted(self.splits.items())),
            "files": self.files,
        }

    def summary(self) -> str:
        lines = [
            f"rows read            {self.rows_read:>8,}",
            f"examples added       {self.added:>8,}  " + ", ".join(f"{k}={v:,}" for k, v in sorted(self.splits.items())),
            f"duplicates in input  {self.duplicates_in_input:>8,}",
            f"already in workspace {self.already_present:>8,}",
            f"rejected             {sum(self.rejected.values()):>8,}",
        ]
        lines += [f"  {reason:<26}{count:>6,}" for reason, count in sorted(self.rejected.items())]
        if self.without_reference_answer:
            lines.append(f"no reference answer  {self.without_reference_answer:>8,}  (kept; answer extraction found none)")
        return "\n".join(lines)


@dataclass(frozen=True)
class SourceOptions:
    fmt: str | None = None
    column_map: Mapping[str, str] = field(default_factory=dict)
    answer_style: str | None = None
    answer_field: str | None = None
    heldout_fraction: float = 0.0
    transform: Any = None  # a built-in source's record transform (curate.models.bundled)
    split: str | None = None  # every row in this split (else drawn from the id by heldout_fraction)


class IngestConflict(ValueError):
    """Examples already in the workspace would get another split or reference answer."""


def ingest(
    sources: Sequence[str],
    *,
    workspace: Workspace,
    fmt: str | None = None,
    column_map: Mapping[str, str] | None = None,
    answer_style: str | None = None,
    answer_field: str | None = None,
    heldout_fraction: float | str | None = None,
    split: str | None = None,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    progress: bool = True,
) -> IngestReport:
    """Ingest files, directories of files, or built-in source names (``gsm8k``) into ``workspace``.

    Options left as None take a built-in source's preset (or the plain default for files). ``split``: every
    row in that split (``pool`` or ``heldout``) instead of a share drawn by id (``heldout_fraction``).
    """
    heldout_fraction = heldout_share(heldout_fraction)
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"--split {split!r}: choose {' or '.join(SPLITS)} (every row of the files goes to that split)")
        if heldout_fraction is not None:
            raise ValueError("give --split (every row to one split) or --heldout-fraction (a share drawn by id), not both")
    plan = [item for s in sources for item in _resolve(s, fmt, column_map, answer_style, answer_field, heldout_fraction, split)]
    spec = {"files": [_file_identity(label, path, options) for label, path, options in plan], "max_row_bytes": max_row_bytes}
    report = IngestReport()
    with workspace.writing(), recorded_run(workspace.root, "ingest", run_key(spec), parameters=spec) as record:
        staged = _Staging(workspace)
        try:
            _read(plan, workspace, staged, report, max_row_bytes, progress)
            staged.commit()
        finally:
            staged.discard()
        record.counts = report.as_dict()
        workspace.write_manifest("ingest", {"sources": list(sources), "spec": spec, "report": report.as_dict()})
    check_tables(workspace, ["examples", "rejects"])
    return report


def _read(plan: list[tuple[str, Path, SourceOptions]], workspace: Workspace, staged: "_Staging", report: IngestReport,
          max_row_bytes: int, progress: bool) -> None:
    existing = _existing(workspace)
    added_ids: set[str] = set()
    seen_rejects = set(workspace.read_column("rejects", "reject_id"))
    conflicts: list[str] = []
    pending: list[dict[str, Any]] = []
    pending_rejects: list[dict[str, Any]] = []
    for label, path, options in plan:
        report.files.append(str(path))
        rows = iter_rows(path, max_row_bytes=max_row_bytes)
        for item in tqdm(rows, desc=f"ingest {label}", unit=" rows", disable=not progress, file=sys.stderr):
            report.rows_read += 1
            outcome = item if isinstance(item, BadRow) else _example(item.data, item.row, label, path, options)
            if isinstance(outcome, BadRow):
                report.rejected[outcome.reason] += 1
                reject = _reject_row(path, outcome)
                if reject["reject_id"] not in seen_rejects:
                    seen_rejects.add(reject["reject_id"])
                    pending_rejects.append(reject)
                continue
            identifier = outcome["example_id"]
            if identifier in existing:
                report.already_present += 1
                if existing[identifier] != (outcome["split"], outcome["reference_answer"]):
                    conflicts.append(f"{identifier} ({path} row {item.row}): split {existing[identifier][0]!r} and reference "
                                     f"answer {existing[identifier][1]!r} in the workspace, {outcome['split']!r} and "
                                     f"{outcome['reference_answer']!r} with these options")
                continue
            if identifier in added_ids:
                report.duplicates_in_input += 1
                continue
            added_ids.add(identifier)
            report.added += 1
            report.splits[outcome["split"]] += 1
            report.without_reference_answer += options.answer_style is not None and outcome["reference_answer"] is None
            pending.append(outcome)
            if len(pending) >= PART_ROWS:
                staged.add("examples", rows_to_table(pending, schema.EXAMPLES))
                pending = []
    if conflicts:
        raise IngestConflict(
            f"{len(conflicts):,} example(s) are already in {workspace.root} with another split or reference answer, so "
            "they were ingested with other --split, --heldout-fraction, --extract-answer or --answer-field values (or a "
            "held-out file repeats pool examples); nothing was written. Ingest with the options used before (see `curate "
            "runs --stage ingest`), leave those rows out of the file, or use a new workspace. First: " + "; ".join(conflicts[:3])
        )
    staged.add("examples", rows_to_table(pending, schema.EXAMPLES))
    staged.add("rejects", rows_to_table(pending_rejects, schema.REJECTS))


class _Staging:
    """Parts written into a hidden folder, moved into their tables only when the whole ingest succeeded."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.folder = temporary_name(workspace.root / "ingest", ".staging-")
        self.parts: list[tuple[str, Path]] = []

    def add(self, table: str, rows: Any) -> None:
        if rows.num_rows == 0:
            return

        self.folder.mkdir(parents=True, exist_ok=True)
        final_name = f"part-{len(self.parts):04d}-{self.folder.name.rsplit('-', 1)[-1]}{PART_SUFFIX}"
        path = self.folder / f"{table}-{final_name}"
        write_atomic_parquet(rows.cast(schema.TABLES[table]), path)
        self.parts.append((table, path))

    def commit(self) -> None:
        import os

        for table, path in self.parts:
            folder = self.workspace.table_dir(table)
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(path, folder / path.name.removeprefix(f"{table}-"))

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _existing(workspace: Workspace) -> dict[str, tuple[str | None, str | None]]:
    """example_id -> (split, reference answer) of what the workspace holds."""
    import pyarrow.parquet as pq

    parts = workspace.parts("examples")
    if not parts:
        return {}
    table = pq.read_table([str(p) for p in parts], columns=["example_id", "split", "reference_answer"])
    return {i: (s, r) for i, s, r in zip(*(table.column(c).to_pylist() for c in ("example_id", "split", "reference_answer")))}


def _file_identity(label: str, path: Path, options: SourceOptions) -> dict[str, Any]:
    stat = path.stat()
    return {"source": label, "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "format": options.fmt, "map": dict(options.column_map), "extract_answer": options.answer_style,
            "answer_field": options.answer_field, "heldout_fraction": options.heldout_fraction,
            "transform": getattr(options.transform, "__name__", None), "split": options.split}


def split_of(example: str, heldout_fraction: float) -> str:
    """Deterministic split by id: the same example lands in the same split on every machine and run."""
    return "heldout" if int(example[:8], 16) / 0x100000000 < heldout_fraction else "pool"


def heldout_share(value: float | str | None) -> float | None:
    """``--heldout-fraction`` as a share in [0, 1]: ``0.25``, ``25%``, ``1`` (every row held out: better said
    ``--split heldout``); anything else is an error that says what is accepted."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        share = float("nan")
    if not 0.0 <= share <= 1.0:  # also refuses nan
        hint = f" ({text} looks like a percentage: write {share / 100:g} or {text}%)" if 1.0 < share <= 100.0 else ""
        raise ValueError(f"--heldout-fraction {text!r}: give the share of examples held out, from 0 to 1 (0.25) or as a "
                         f"percentage (25%){hint}; for a whole file of held-out examples use --split heldout")
    return share


def expand_files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and child.suffix.lower() in SUFFIXES and not child.name.startswith("."):
                yield child
    elif path.is_file():
        yield path
    else:
        known = ", ".join(BUILTIN_SOURCES)
        raise FileNotFoundError(f"source {str(path)!r} is neither a file, a directory, nor a built-in source ({known})")


def _resolve(
    source: str,
    fmt: str | None,
    column_map: Mapping[str, str] | None,
    answer_style: str | None,
    answer_field: str | None,
    heldout_fraction: float | None,
    split: str | None = None,
) -> list[tuple[str, Path, SourceOptions]]:
    builtin: BuiltinSource | None = None if Path(source).exists() else BUILTIN_SOURCES.get(source)
    if builtin is not None:
        options = SourceOptions(
            fmt=fmt,
            column_map=column_map or builtin.column_map,
            answer_style=answer_style or builtin.answer_style,
            answer_field=answer_field or builtin.answer_field,
            heldout_fraction=0.0 if split else builtin.heldout_fraction if heldout_fraction is None else heldout_fraction,
            transform=builtin.transform,
            split=split,
        )
        return [(builtin.name, builtin.path(), options)]
    options = SourceOptions(fmt, column_map or {}, answer_style, answer_field, heldout_fraction or 0.0, split=split)
    return [(str(p), p, options) for p in expand_files(Path(source))]


def _example(data: dict[str, Any], row: int, label: str, path: Path, options: SourceOptions) -> dict[str, Any] | BadRow:
    record = apply_column_map(options.transform(data) if options.transform else data, options.column_map)
    try:
        fmt = options.fmt or detect_format(record)
        messages = to_messages(record, fmt)
        reference = _reference_answer(record, messages, options)
    except RecordError as err:
        return BadRow(row, err.reason, err.detail, shorten(json.dumps(data, ensure_ascii=False, default=str)))
    identifier = example_id(messages)
    meta = {"origin": {"file": str(path), "row": row}, "format": fmt, "fields": unused_fields(record, fmt)}
    return {
        "example_id": identifier,
        "source": label,
        "split": options.split or split_of(identifier, options.heldout_fraction),
        "messages": messages,
        "reference_answer": reference,
        "meta": json.dumps(meta, ensure_ascii=False, default=str),
    }


def _reference_answer(record: Mapping[str, Any], messages: list[dict[str, str]], options: SourceOptions) -> str | None:
    if options.answer_field is not None:
        value = record.get(options.answer_field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise RecordError("missing_field", f"answer field {options.answer_field!r} is missing or empty")
        return str(value).strip()
    if options.answer_style is not None:
        return extract_answer(messages[-1]["content"], options.answer_style)
    return None


def _reject_row(path: Path, bad: BadRow) -> dict[str, Any]:
    key = f"{path.resolve()}\0{bad.row}\0{bad.reason}"
    return {
        "reject_id": hashlib.sha256(key.encode("utf-8")).hexdigest()[:16],
        "source_file": str(path),
        "row": bad.row,
        "reason": bad.reason,
        "detail": bad.detail,
        "raw": bad.raw,
    }
