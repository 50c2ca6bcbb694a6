"""Readable references to runs, and ``curate runs``.

Where a key is asked for (a recipe's ``base_key``, ``curate plot --score-key``), users may write:
- the key itself, as a command printed it (16 hex digits) or as a table holds it;
- a run id from ``curate runs``;
- a model: an alias (``smollm2``), a checkpoint path, or its folder's name; it means that model's latest
  finished run of the kind asked for. A pair run is named by its calibrated model, or ``BASE,CALIBRATED``.
A reference resolves by what a run is, not by the label it was started with: runs that carry the same key, or
whose models have the same fingerprint (weights, config, tokenizer and template), are runs of one model, however
each was named (an alias in one run, its resolved path in another). A reference that matches runs of more than
one model is an error that lists them; one that matches nothing lists what there is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.kernel.lock import active_holder
from curate.kernel.runs import RUNS_TABLE, model_names
from curate.store.sql import connect
from curate.store.workspace import Workspace

# run type -> (tables and the column holding its keys, stages whose runs provide such keys)
RUN_KINDS = {
    "score_run": (("sample_scores", "token_scores"), "score_key", ("score", "pair")),
    "pair_run": (("pair_scores",), "pair_key", ("pair",)),
    "probe_run": (("probe_scores",), "probe_key", ("probe",)),
    "generate_run": (("traces", "best_traces"), "gen_key", ("generate",)),
}


class ReferenceError(LookupError):
    pass


@dataclass(frozen=True)
class Candidate:
    key: str
    model: str  # the model's resolved path, as shown to the user
    names: tuple[str, ...]
    finished_at: Any
    run_id: str
    identity: str = ""  # what the model is: its fingerprint where the run recorded one, else its path


def read_runs(workspace: Workspace) -> list[dict[str, Any]]:
    """Every run record, newest first."""
    import pyarrow.parquet as pq

    parts = workspace.parts(RUNS_TABLE)
    if not parts:
        return []
    rows = pq.read_table([str(p) for p in parts]).to_pylist()
    return sorted(rows, key=lambda r: r["started_at"], reverse=True)


def _candidates(runs: list[dict[str, Any]], kind: str) -> list[Candidate]:
    stages = RUN_KINDS[kind][2]
    found = []
    for run in runs:
        if run["stage"] not in stages or run["status"] != "finished":
            continue
        parameters = json.loads(run["parameters"] or "{}")
        if run["stage"] == "pair" and kind == "score_run":  # a pair run scored both of its models
            for side in ("base", "calibrated"):
                model = parameters[side]
                found.append(Candidate(model["key"], model["path"], _names(model), run["finished_at"], run["run_id"], _identity(model)))
        elif run["stage"] == "pair":
            base, calibrated = parameters["base"], parameters["calibrated"]
            names = _names(calibrated) + tuple(f"{b},{c}" for b in _names(base) for c in _names(calibrated))
            found.append(Candidate(run["key"], f"{base['path']},{calibrated['path']}", names, run["finished_at"], run["run_id"],
                                   f"{_identity(base)},{_identity(calibrated)}"))
        elif run["stage"] == "score" and parameters.get("models"):  # a single-model scoring run: its model as recorded
            model = parameters["models"][0]
            found.append(Candidate(run["key"], model.get("path") or model["model"], tuple(run["models"] or ()) or _names(model),
                                   run["finished_at"], run["run_id"], _identity(model)))
        else:
            path = parameters.get("path") or (run["models"] or [""])[0]
            fingerprints = list(json.loads(run["fingerprints"] or "{}").values())
            identity = f"fingerprint:{fingerprints[0]}" if len(fingerprints) == 1 else f"path:{path}"
            found.append(Candidate(run["key"], path, tuple(run["models"] or ()), run["finished_at"], run["run_id"], identity))
    return found


def _identity(model: dict[str, Any]) -> str:
    """What a recorded model is: the fingerprint in its run spec, else its resolved path."""
    spec = model.get("spec")
    fingerprint = (spec.get("model") or {}).get("fingerprint") if isinstance(spec, dict) else None
    return f"fingerprint:{fingerprint}" if fingerprint else f"path:{model.get('path') or model.get('model')}"


def _models(matching: list[Candidate]) -> list[list[Candidate]]:
    """The matching runs grouped by the model they are runs of: two runs are of one model when they carry the
    same key or the same model identity (so an alias in one run and its path in another are one model)."""
    groups: list[tuple[set[str], list[Candidate]]] = []
    for candidate in matching:
        labels = {f"key:{candidate.key}", candidate.identity or f"path:{candidate.model}"}
        joined = [g for g in groups if g[0] & labels]
        merged = (labels.union(*(g[0] for g in joined)), [candidate] + [c for g in joined for c in g[1]])
        groups = [g for g in groups if not any(g is j for j in joined)] + [merged]
    return [members for _, members in groups]


def _spellings(names: tuple[str, ...]) -> set[str]:
    """A run's names, with each path also as the real path it points to (a cache entry may be a link)."""
    return set(names) | {os.path.realpath(n) for n in names if os.path.isabs(n)}


def _names(model: dict[str, Any]) -> tuple[str, ...]:
    return tuple(model_names(model["model"], model.get("path")))


def resolve(workspace: Workspace, kind: str, reference: str, *, parameter: str = "") -> str:
    """The run key a reference means (see the module docstring)."""

    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run type {kind!r}; choose one of {', '.join(RUN_KINDS)}")
    tables, column, _ = RUN_KINDS[kind]
    present = [t for t in tables if t in workspace.tables()]
    keys: set[str] = set()
    if present:
        con = connect(workspace)
        for table in present:
            keys |= {k for (k,) in con.execute(f"select distinct {column} from {table}").fetchall()}
    if reference in keys:
        return reference
    runs = read_runs(workspace)
    candidates = _candidates(runs, kind)
    by_run = [c for c in candidates if c.run_id == reference or c.key == reference]
    if by_run:
        return by_run[0].key
    spellings = {reference}
    if Path(reference).expanduser().exists():
        spellings.add(str(Path(reference).expanduser().resolve()))
    matching = [c for c in candidates if spellings & _spellings(c.names)]
    label = f"{parameter} = {reference!r}" if parameter else repr(reference)
    if not matching:
        known = sorted({c.names[0] for c in candidates})
        raise ReferenceError(
            f"{label}: no finished {kind.replace('_', ' ')} matches it. Give a run key (in {tables[0]}: "
            f"{', '.join(sorted(keys)[:8]) or 'none'}) or a model with a finished run ({', '.join(known) or 'none'}); "
            "`curate runs` lists them"
        )
    models = _models(matching)
    if len(models) > 1:
        latest = sorted((max(group, key=lambda c: c.finished_at) for group in models), key=lambda c: c.model)
        listed = "; ".join(f"{c.model} (key {c.key})" for c in latest)
        raise ReferenceError(f"{label} is ambiguous: it matches runs of {len(models)} models: {listed}. "
                             "Name the model by its path, or give the key")
    return max(matching, key=lambda c: c.finished_at).key


def runs_table(workspace: Workspace, *, stage: str | None = None, limit: int = 40) -> str:
    """``curate runs``: the registry, newest first, readable."""
    runs = [r for r in read_runs(workspace) if stage is None or r["stage"] == stage][:limit]
    if not runs:
        return f"no runs recorded in {workspace.root}" + (f" for stage {stage}" if stage else "")
    writer = active_holder(workspace.root)
    header = f"{'started (UTC)':<20} {'stage':<9} {'status':<9} {'key':<16} {'seconds':>8}  {'model / what':<38} counts"
    lines = [header, "-" * len(header)]
    for run in runs:
        status = run["status"]
        if status == "started" and not (writer and writer.get("pid") == run["pid"]):
            status = "died"  # started, never ended, and its process no longer holds the workspace
        seconds = f"{run['seconds']:.0f}" if run["seconds"] is not None else ""
        what = (run["models"] or [json.loads(run["parameters"] or "{}").get("recipe", "")])[0]
        lines.append(f"{run['started_at']:%Y-%m-%d %H:%M:%S} {run['stage']:<9} {status:<9} {run['key']:<16} {seconds:>8}  "
                     f"{_short(str(what), 38):<38} {_counts(run['counts'])}")
    return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _counts(counts: str | None) -> str:
    values = json.loads(counts or "{}")
    shown = [f"{k}={v:,}" for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool) and v][:4]
    return ", ".join(shown)
