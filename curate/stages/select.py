"""``curate select``: run a SQL recipe, audit its rows, and materialize them into ``selections/<name>``.

A recipe returns one row per chosen example with ``example_id`` and, where it makes them:
- ``assistant_text``: replaces the example's last assistant turn (a teacher trace, or an answer-only reply);
- ``prompt``: with ``assistant_text``, replaces the whole conversation: ``prompt`` (a list of messages: the
  exact prompt a teacher saw, or the question with an answer-only instruction) and the reply after it;
- ``stage``: which training stage a row belongs to (``train sft --stage N``);
- ``token_ids``, ``is_response``, ``loss_mask``: the scored conversation's tokens (from ``token_scores``),
  which of them are response tokens, and which to train on (1) — written as ``input_ids`` / ``loss_mask``;
- ``weight``, ``bucket``, ``n_response_tokens`` and any other columns, kept as they are.
The selection holds the rows the trainer (and export) read: ``example_id``, ``messages``,
``reference_answer``, ``split``, then the recipe's columns. Audits run before anything is written: ids
unique and present in ``examples``, masks as long as their tokens, never all zero, and the end-of-turn
token (the last response token) still trained. A row with no response token at all (a conversation cut by
``--overlong truncate`` before its reply) is dropped with a counted reason, never failing the rest.
A manifest records the SQL text and hash, the parameters, the input tables' fingerprints, the chat-template
hashes of the scores used, and counts; it is stored inside the Parquet file (its metadata) and beside it as
``manifest.json``. The file is replaced in one rename: a reader sees the old selection or the new one.
A selection with no rows left (the recipe returned none, or every row was dropped) is refused with the counts
and nothing written, an earlier selection of that name kept: it is a mistake in the rule or a parameter that
matches nothing (``allow_empty`` writes it anyway).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from curate.kernel.atomic import write_atomic_text
from curate.kernel.chat_tokens import with_reply
from curate.kernel.fingerprint import table_fingerprint
from curate.kernel.keys import run_key
from curate.kernel.runs import recorded_run
from curate.stages.recipes import NEEDS, RUN_TYPES, Recipe
from curate.store.run_refs import resolve
from curate.store.schema import MESSAGE
from curate.store.sql import connect
from curate.store.workspace import PART_SUFFIX, Workspace, write_atomic_parquet

MANIFEST_KEY = b"curate.manifest"
# rows a recipe returns that cannot be trained on: dropped and counted, never failing the selection
# (reason, the column the check reads, the query returning the rows to drop)
DROPS = (
    ("no_response_tokens", "is_response", "select example_id from chosen where not list_contains(is_response, true)"),
    ("no_response_tokens", "n_response_tokens", "select example_id from chosen where n_response_tokens = 0"),
    ("every_token_masked", "loss_mask", "select example_id from chosen where list_sum(loss_mask) = 0"),
)

_NAME = re.compile(r"[A-Za-z0-9_]+")
TOKEN_COLUMNS = ("token_ids", "is_response", "loss_mask")

# Audits return the rows that break a rule; a recipe's header may name the ones that apply to it (default all).
AUDITS = {
    "duplicate_example_id": "select example_id from chosen group by example_id having count(*) > 1",
    "unknown_example_id": "select example_id from chosen anti join examples using (example_id)",
    "mask_length_differs": "select example_id from chosen where loss_mask is not null and len(loss_mask) <> len(token_ids)",
    "end_of_turn_not_trained": """
        select example_id from chosen
        where loss_mask is not null and list_contains(is_response, true)
          and loss_mask[len(is_response) - list_position(list_reverse(is_response), true) + 1] = 0""",
    "mask_with_replaced_answer": """
        select example_id from chosen where loss_mask is not null and (assistant_text is not null or prompt is not null)""",
}


class AuditError(ValueError):
    pass


class EmptySelection(ValueError):
    """No row is left to train on: refused unless asked for (``allow_empty``)."""


@dataclass
class SelectReport:
    name: str
    rows: int = 0
    returned: int = 0  # rows the recipe returned, before the kept ids and the drops
    outside_keep: int = 0  # of those, rows not among the kept ids (a study's pool or budget subset)
    buckets: dict[str, int] = field(default_factory=dict)
    masked_rows: int = 0
    mask_tokens_kept: int = 0
    mask_tokens_total: int = 0
    response_tokens: int | None = None  # sum of the recipe's n_response_tokens column, when it has one
    dropped: Counter[str] = field(default_factory=Counter)
    written: str | None = None

    def summary(self) -> str:
        lines = [f"selection            {self.name}", f"rows                 {self.rows:>8,}"]
        lines += [f"dropped              {count:>8,}  ({reason})" for reason, count in sorted(self.dropped.items())]
        lines += [f"  {bucket:<19}{count:>8,}" for bucket, count in sorted(self.buckets.items())]
        if self.response_tokens is not None:
            lines.append(f"response tokens      {self.response_tokens:>8,}")
        if self.masked_rows:
            share = self.mask_tokens_kept / max(self.mask_tokens_total, 1)
            lines.append(f"rows with a mask     {self.masked_rows:>8,}  (tokens trained {self.mask_tokens_kept:,} of {self.mask_tokens_total:,} response tokens, {share:.1%})")
        lines.append(f"written to           {self.written}" if self.written else "dry run: nothing written")
        return "\n".join(lines)


def bind(workspace: Workspace, recipe: Recipe, params: dict[str, str]) -> dict[str, Any]:
    """The recipe's parameters, typed, with run references turned into keys (checked before anything runs)."""

    bound = recipe.bind(params, lambda kind, name, value: resolve(workspace, kind, value, parameter=name))
    require_needs(workspace, recipe, bound)
    return bound


# need -> (the run type whose parameters must have it, {table holding it: the condition on a run's rows there})
_HAS = {
    "scores": ("score_run", {"sample_scores": "score_key = $key", "token_scores": "score_key = $key"}),
    "ifd": ("score_run", {"sample_scores": "score_key = $key and ifd is not null",
                          "token_scores": "score_key = $key and variant = 'response_only'"}),
    # KL comes from two models' hidden states: a pair of log-prob servers (--pair-endpoints) has the log-ratio only
    "kl": ("pair_run", {"pair_scores": "pair_key = $key and base_key not in (select score_key from token_scores where signals = 'logprob-only')"}),
    "probe": ("probe_run", {"probe_scores": "probe_key = $key"}),
    "traces": ("generate_run", {"best_traces": "gen_key = $key"}),
}


def require_needs(workspace: Workspace, recipe: Recipe, bound: dict[str, Any]) -> None:
    """Refuse, before the recipe runs, a run that lacks a signal the recipe's header says it reads (an IFD recipe on
    a run scored without ``--ifd``, an entropy recipe on a server's prompt log-probs); the error names the step."""

    runs = {n: (p.kind, bound[n]) for n, p in recipe.parameters.items() if p.kind in RUN_TYPES and n in bound}
    tables = workspace.tables()
    con = connect(workspace)
    for need in recipe.needs:
        if need == "entropy" and "token_scores" in tables:
            _require_exact(con, recipe, {n: key for n, (kind, key) in runs.items() if kind == "score_run"})
        elif need == "calibrated":
            scored = [(n, key) for n, (kind, key) in runs.items() if kind == "score_run"]
            if len({key for _, key in scored}) < 2:
                listed = ", ".join(f"{n} = {key}" for n, key in scored) or "none"
                raise ValueError(f"{recipe.path.name} needs {NEEDS[need]}; its scoring runs ({listed}) are one run: pass the "
                                 "calibrated model's run")
        elif need in _HAS:
            kind, conditions = _HAS[need]
            for name, (given_kind, key) in runs.items():
                present = [t for t in conditions if t in tables]
                if given_kind == kind and not any(
                        con.execute(f"select exists (select 1 from {t} where {conditions[t]})", {"key": key}).fetchall()[0][0]
                        for t in present):
                    raise ValueError(f"{recipe.path.name} needs {need}, and {name} = {key} has none (in "
                                     f"{' or '.join(conditions)}): {NEEDS[need]}, then select again")


def _require_exact(con: Any, recipe: Recipe, keys: dict[str, Any]) -> None:
    """Refuse a scoring run without full-vocabulary entropy (scored through a server's prompt log-probs)."""

    for name, key in keys.items():
        found = {s for (s,) in con.execute("select distinct signals from token_scores where score_key = ?", [key]).fetchall()}
        if "logprob-only" in found:
            raise ValueError(
                f"{recipe.path.name} needs full-vocabulary entropy{' and KL' if 'kl' in recipe.needs else ''}, and {name} = {key} was "
                "scored through a server's prompt log-probs (a top-k: no entropy). Score the model in-process, `curate score "
                "--model M` (vLLM's pooling runner and our head compute it exactly), and pass that run")


def run_recipe(workspace: Workspace, recipe: Recipe, params: dict[str, str]) -> pa.Table:
    """The recipe's rows (no audits, nothing written): what Python users feed to Polars or pandas."""

    return _run(connect(workspace), recipe, bind(workspace, recipe, params), workspace)


def _run(con: Any, recipe: Recipe, bound: dict[str, Any], workspace: Workspace) -> pa.Table:
    import duckdb

    try:
        return con.sql(recipe.sql, params=bound).to_arrow_table()
    except duckdb.Error as err:
        tables = ", ".join(workspace.tables()) or "none"
        raise ValueError(f"{recipe.path.name}: {err} (tables in this workspace: {tables})") from err


def select(workspace: Workspace, recipe: Recipe, *, name: str, params: dict[str, str] | None = None, dry_run: bool = False,
           keep: list[str] | None = None, keep_note: str | None = None, allow_empty: bool = False) -> SelectReport:
    """Run, audit and write a selection. ``keep``: only these example ids of the recipe's rows (a study's pool,
    or a subset brought to a token budget; ``keep_note`` says how, in the manifest). A selection with no rows
    raises EmptySelection (nothing written) unless ``allow_empty``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"selection name {name!r}: use letters, digits and underscores (it becomes the view selections_{name})")
    bound = bind(workspace, recipe, params or {})
    if dry_run:
        report = _choose(workspace, recipe, bound, name, keep)[0]
        _refuse_empty(recipe, bound, report, allow_empty=allow_empty, dry_run=True)
        return report
    spec = {"recipe": recipe.name, "sql_hash": recipe.sql_hash, "parameters": bound, "inputs": _inputs(workspace, recipe),
            "keep": sorted(keep) if keep is not None else None}
    with workspace.writing(), recorded_run(workspace.root, "select", run_key(spec), models=[name],
                                           parameters={**spec, "selection": name, "keep": keep_note}) as record:
        report, rows, con = _choose(workspace, recipe, bound, name, keep)
        _refuse_empty(recipe, bound, report, allow_empty=allow_empty)
        manifest = _manifest(workspace, recipe, bound, report, con) | {"key": run_key(spec), "subset": keep_note}
        table = materialize(rows)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), MANIFEST_KEY: json.dumps(manifest, default=str).encode()})
        folder = workspace.table_dir(f"selections/{name}")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic_parquet(table, folder / f"part-0{PART_SUFFIX}")  # one rename: the old selection or the new one
        write_atomic_text(folder / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
        workspace.write_manifest("select", manifest)
        report.written = str(folder)
        record.counts = {k: v for k, v in vars(report).items() if k not in ("name", "written")}
    return report


def _refuse_empty(recipe: Recipe, bound: dict[str, Any], report: SelectReport, *, allow_empty: bool, dry_run: bool = False) -> None:
    """No row left is a mistake in the rule (or a parameter matching nothing): an error with the counts."""
    if report.rows or allow_empty:
        return
    steps = [f"the recipe returned {report.returned:,} row(s)"]
    if report.outside_keep:
        steps.append(f"{report.outside_keep:,} not among the kept ids")
    steps += [f"dropped {count:,} ({reason})" for reason, count in sorted(report.dropped.items())]
    given = ", ".join(f"{k} = {v!r}" for k, v in sorted(bound.items())) or "none"
    raise EmptySelection(
        f"selection {report.name} ({recipe.path.name}) has no rows left: {'; '.join(steps)}. "
        f"{'Nothing would be written' if dry_run else 'Nothing was written (an earlier selection of this name is kept)'}. "
        f"Check the rule and its parameters ({given}): a value that matches nothing (a split's name, a key) gives no rows; "
        "pass --allow-empty (allow_empty=True) to write an empty selection anyway")


def choose(workspace: Workspace, recipe: Recipe, params: dict[str, str], *, keep: list[str] | None = None) -> pa.Table:
    """The rows a selection would hold (audited, materialized: what the trainer reads), written nowhere."""
    return materialize(_choose(workspace, recipe, bind(workspace, recipe, params), recipe.name, keep)[1])


def _choose(workspace: Workspace, recipe: Recipe, bound: dict[str, Any], name: str,
            keep: list[str] | None = None) -> tuple[SelectReport, pa.Table, Any]:
    """Run the recipe, keep the ``keep`` ids if given, drop the rows that cannot train (counted), audit the
    rest, join the examples."""

    con = connect(workspace)
    chosen = _run(con, recipe, bound, workspace)
    if "example_id" not in chosen.column_names:
        raise ValueError(f"{recipe.path.name}: the recipe must return an example_id column (it returned {chosen.column_names})")
    for column, kind in (("assistant_text", pa.string()), ("prompt", pa.list_(MESSAGE)), ("token_ids", pa.list_(pa.int32())),
                         ("is_response", pa.list_(pa.bool_())), ("loss_mask", pa.list_(pa.int8()))):
        if column not in chosen.column_names:
            chosen = chosen.append_column(column, pa.nulls(chosen.num_rows, kind))
    con.register("recipe_rows", chosen)
    con.execute("create or replace temp table chosen as select * from recipe_rows")
    outside = 0
    if keep is not None:
        con.register("kept_ids", pa.table({"example_id": pa.array(sorted(keep), pa.string())}))
        outside = con.execute("select count(*) from chosen where example_id not in (select example_id from kept_ids)").fetchall()[0][0]
        con.execute("delete from chosen where example_id not in (select example_id from kept_ids)")
    dropped: Counter[str] = Counter()
    for reason, column, query in DROPS:
        if column not in chosen.column_names:
            continue
        bad = [r[0] for r in con.execute(query).fetchall()]
        if bad:
            dropped[reason] += len(bad)
            con.execute("delete from chosen where list_contains($bad, example_id)", {"bad": bad})
    _audit(con, recipe)
    rows = con.sql(
        "select c.*, e.messages, e.reference_answer, e.split from chosen c join examples e using (example_id) order by example_id"
    ).to_arrow_table()
    report = _report(name, rows)
    report.dropped, report.returned, report.outside_keep = dropped, chosen.num_rows, outside
    return report, rows, con


def read_manifest(table: pa.Table) -> dict[str, Any]:
    """The manifest a selection's Parquet file carries (written with its rows, in the same file)."""
    raw = (table.schema.metadata or {}).get(MANIFEST_KEY)
    return json.loads(raw) if raw else {}


def _audit(con: Any, recipe: Recipe) -> None:
    unknown = sorted(set(recipe.audits or ()) - set(AUDITS))
    if unknown:
        raise ValueError(f"{recipe.path.name}: unknown audit(s) {unknown} in its header; audits: {', '.join(AUDITS)}")
    failures = []
    for audit, query in AUDITS.items():
        if recipe.audits is not None and audit not in recipe.audits:
            continue
        bad = [r[0] for r in con.execute(query).fetchall()]
        if bad:
            failures.append(f"{audit}: {len(bad)} row(s), e.g. {', '.join(map(str, bad[:5]))}")
    if failures:
        raise AuditError(f"{recipe.path.name}: audits failed, nothing written:\n  " + "\n  ".join(failures))


def materialize(rows: pa.Table) -> pa.Table:
    """messages with the recipe's assistant turn; token columns renamed to what trainers read."""
    messages = []
    for original, prompt, reply in zip(*(rows.column(c).to_pylist() for c in ("messages", "prompt", "assistant_text"))):
        if prompt is not None:
            messages.append([*prompt, {"role": "assistant", "content": reply}])
        elif reply is not None:
            messages.append(with_reply(original, reply))
        else:
            messages.append(original)
    first = ["example_id", "messages", "reference_answer", "split"]
    rest = [c for c in rows.column_names if c not in (*first, "assistant_text", "prompt", *TOKEN_COLUMNS)]
    columns = {"example_id": rows.column("example_id"), "messages": pa.array(messages, type=rows.schema.field("messages").type),
               "reference_answer": rows.column("reference_answer"), "split": rows.column("split")}
    columns |= {c: rows.column(c) for c in rest}
    columns["input_ids"] = rows.column("token_ids")
    columns["loss_mask"] = rows.column("loss_mask").cast(pa.list_(pa.int8()))
    return pa.table(columns)


def _report(name: str, rows: pa.Table) -> SelectReport:
    report = SelectReport(name, rows=rows.num_rows)
    if "bucket" in rows.column_names:
        for bucket in rows.column("bucket").to_pylist():
            report.buckets[str(bucket)] = report.buckets.get(str(bucket), 0) + 1
    if "n_response_tokens" in rows.column_names:
        report.response_tokens = int(sum(v or 0 for v in rows.column("n_response_tokens").to_pylist()))
    for mask, response in zip(rows.column("loss_mask").to_pylist(), rows.column("is_response").to_pylist()):
        if mask is not None:
            report.masked_rows += 1
            report.mask_tokens_kept += sum(mask)
            report.mask_tokens_total += sum(bool(r) for r in response or [])
    return report


def _inputs(workspace: Workspace, recipe: Recipe) -> dict[str, dict[str, Any]]:
    """Fingerprints of the tables the recipe reads (names, sizes and times of their parts)."""

    return {table: {"parts": len(workspace.parts(table)), "fingerprint": table_fingerprint(folder)}
            for table, folder in workspace.tables().items()
            if not table.startswith("selections_") and re.search(rf"\b{table}\b", recipe.sql)}


def _manifest(workspace: Workspace, recipe: Recipe, bound: dict[str, Any], report: SelectReport, con: Any) -> dict[str, Any]:
    inputs = _inputs(workspace, recipe)
    keys = [str(v) for v in bound.values() if isinstance(v, str)]
    templates = []
    if "token_scores" in inputs and keys:
        templates = [r[0] for r in con.execute(
            "select distinct template_hash from token_scores where list_contains($keys, score_key)", {"keys": keys}).fetchall()]
    return {
        "selection": report.name, "recipe": recipe.name, "recipe_path": str(recipe.path), "sql": recipe.sql,
        "sql_hash": recipe.sql_hash, "parameters": bound, "inputs": inputs, "template_hashes": templates,
        "counts": {k: v for k, v in vars(report).items() if k not in ("name", "written")},
    }
