"""``curate report [NAME]``: one self-contained HTML file about a selection (or the whole workspace).

Everything is inline (no server, no network, no CDN): the data as gzip-compressed JSON in the page, decoded
by the browser's own DecompressionStream, and a small script that draws the plane and histograms as SVG and
builds the table. The table pages through the selected examples (50 a page, filterable); a row opens into its
token heatmap (hover: log-prob, entropy, top-k alternatives; masked tokens struck through) and its teacher
traces with their verdicts. Only the current page and the open example are in the DOM, so 10,000 selected
examples stay fast; the file carries token detail for the first ``token_examples`` of them (the table lists
all, and says which have none). ``#example=ID`` in the address opens an example when the page loads.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

from curate.kernel.atomic import write_atomic_text
from curate.models.registry import resolve
from curate.stages.export import read_selection
from curate.store.run_refs import read_runs
from curate.store.sql import connect
from curate.store.workspace import Workspace

PAGE_ROWS = 50
TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "report.html"  # package data of curate
SAMPLE_COLUMNS = ("mean_nll", "ppl", "mean_entropy", "n_response_tokens", "ifd")


def collect(workspace: Workspace, name: str | None, *, token_examples: int = 1000) -> dict[str, Any]:
    """The report's data: counts, runs, the selection and its manifest, the plane, histograms, rows, tokens."""

    con = connect(workspace)
    tables = workspace.tables()
    data: dict[str, Any] = {
        "title": f"selection {name}" if name else f"workspace {workspace.root.name}",
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "workspace": str(workspace.root),
        "counts": {t: con.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables},
        "runs": [{k: (str(v) if k in ("started_at", "finished_at") else v) for k, v in run.items()
                  if k in ("run_id", "stage", "status", "key", "seconds", "models", "parameters", "started_at", "counts")}
                 for run in read_runs(workspace)[:60]],
        "page_rows": PAGE_ROWS,
    }
    selected: list[str] = []
    if name:
        data["selection"], rows = _selection(workspace, con, name)
        selected = [r["example_id"] for r in rows]
        data["rows"] = rows
    else:
        data["selections"] = [{"name": t.removeprefix("selections_"), "rows": data["counts"][t]} for t in tables if t.startswith("selections_")]
    key = _score_key(con, tables, data.get("selection"))
    data["score_key"] = key
    if key:
        data["plane"] = _plane(con, key, set(selected))
        data["histograms"] = _histograms(con, key, data.get("rows", []))
        if name:
            _attach_samples(con, key, data["rows"])
            detail = selected[:token_examples] if "token_scores" in tables else []
            data["tokens"] = _tokens(con, key, detail, workspace, name)
            data["traces"] = _traces(con, detail) if "traces" in tables else {}
            data["token_examples"] = len(detail)
    return data


def _selection(workspace: Workspace, con, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    table, manifest = read_selection(workspace, name)
    keep = [c for c in table.column_names if c not in ("messages", "input_ids", "loss_mask", "prompt")]
    rows = table.select(keep).to_pylist()
    masks = table.column("loss_mask").to_pylist() if "loss_mask" in table.column_names else [None] * table.num_rows
    for row, mask in zip(rows, masks):
        row["kept"] = None if mask is None else int(sum(mask))  # trained tokens of a masked row
    info = {"name": name, "recipe": manifest.get("recipe"), "sql": manifest.get("sql"), "sql_hash": manifest.get("sql_hash"),
            "parameters": manifest.get("parameters", {}), "manifest": manifest}
    return info, [{k: _plain(v) for k, v in row.items()} for row in rows]


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return None if value != value else round(value, 5)
    if isinstance(value, (list, dict)):
        return json.loads(json.dumps(value, default=str))
    return value


def _score_key(con, tables: dict, selection: dict | None) -> str | None:
    """The scoring run the report draws: the one the selection's parameters name, else the only one, else the latest."""
    if "sample_scores" not in tables:
        return None
    keys = [k for (k,) in con.execute("select distinct score_key from sample_scores").fetchall()]
    for value in (selection or {}).get("parameters", {}).values():
        if value in keys:
            return value
    if len(keys) == 1:
        return keys[0]
    latest = con.execute("select key from runs where stage in ('score', 'pair') and status = 'finished' order by started_at desc limit 1").fetchall() \
        if "runs" in tables else []
    return latest[0][0] if latest and latest[0][0] in keys else (keys[0] if keys else None)


def _plane(con, key: str, selected: set[str]) -> dict[str, Any]:
    rows = con.execute("select example_id, ppl, mean_entropy from sample_scores where score_key = ? and ppl is not null order by example_id",
                       [key]).fetchall()
    return {"ids": [r[0] for r in rows], "ppl": [round(r[1], 4) for r in rows], "entropy": [round(r[2], 4) for r in rows],
            "selected": [r[0] in selected for r in rows]}


def _histograms(con, key: str, rows: list[dict]) -> list[dict[str, Any]]:
    """Scored examples per signal, the selected ones over them, and the selection's cut-offs (its min and max)."""
    found = []
    signals = {"mean NLL": "mean_nll", "mean entropy": "mean_entropy"}
    for label, column in signals.items():
        values = [r[0] for r in con.execute(f"select {column} from sample_scores where score_key = ? and {column} is not null", [key]).fetchall()]
        chosen = set(r["example_id"] for r in rows)
        picked = [r[0] for r in con.execute(f"select {column} from sample_scores where score_key = ? and list_contains(?, example_id)",
                                             [key, list(chosen)]).fetchall() if r[0] is not None] if chosen else []
        found.append({"label": label, "values": [round(v, 4) for v in values], "selected": [round(v, 4) for v in picked],
                      "cuts": [min(picked), max(picked)] if picked else []})
    for column in ("diff_nll", "diff_entropy", "entropy_norm", "ppl", "ifd"):  # a recipe's own signals: the selected values
        values = [r[column] for r in rows if isinstance(r.get(column), (int, float))]
        if values and column not in signals.values():
            found.append({"label": column.replace("_", " "), "values": [], "selected": values, "cuts": [min(values), max(values)]})
    return found


def _attach_samples(con, key: str, rows: list[dict]) -> None:
    found = {r[0]: r[1:] for r in con.execute(
        f"select example_id, {', '.join(SAMPLE_COLUMNS)} from sample_scores where score_key = ?", [key]).fetchall()}
    for row in rows:
        values = found.get(row["example_id"])
        for column, value in zip(SAMPLE_COLUMNS, values or [None] * len(SAMPLE_COLUMNS)):
            row.setdefault(column, _plain(value))
        if row.get("kept") is not None and row.get("n_response_tokens") is not None:
            row["masked"] = row["n_response_tokens"] - row["kept"]  # response tokens the mask leaves out


def _tokens(con, key: str, ids: list[str], workspace: Workspace, name: str) -> dict[str, Any]:
    """Per example: token ids, log-probs, entropies, response and mask flags, top-k; plus one vocabulary of the
    token texts they use (a token's text is stored once)."""
    from transformers import AutoTokenizer

    if not ids:
        return {"vocab": {}, "examples": {}}
    rows = con.execute("""select t.example_id, t.model, t.token_ids, t.logprob, t.entropy, t.is_response, t.top_ids, t.top_logprobs
                          from token_scores t where t.score_key = ? and t.variant = 'chat' and list_contains(?, t.example_id)""",
                       [key, ids]).fetchall()
    masks = dict(con.execute(f'select example_id, loss_mask from "selections_{name}" where input_ids is not null').fetchall())
    tokenizer = AutoTokenizer.from_pretrained(resolve(rows[0][1])) if rows else None
    vocab: dict[int, str] = {}
    examples = {}
    for example, _, token_ids, logprob, entropy, response, top_ids, top_logprobs in rows:
        for t in token_ids:
            vocab.setdefault(t, tokenizer.decode([t]))
        for alternatives in top_ids:
            for t in alternatives or []:
                vocab.setdefault(t, tokenizer.decode([t]))
        mask = masks.get(example)
        examples[example] = {
            "ids": token_ids, "lp": [None if v is None else round(v, 3) for v in logprob],
            "h": [None if v is None else round(v, 3) for v in entropy], "r": [int(r) for r in response],
            "m": None if mask is None else [int(bool(r) and not k) for r, k in zip(response, mask)],
            "top": [None if ids_ is None else [[i, round(v, 3)] for i, v in zip(ids_, values)] for ids_, values in zip(top_ids, top_logprobs)],
        }
    return {"vocab": {str(k): v for k, v in vocab.items()}, "examples": examples}


def _traces(con, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for example, text, answer, reference, correct, truncated, sample in con.execute(
            """select example_id, text, extracted_answer, reference_answer, is_correct, truncated, sample_index
               from traces where list_contains(?, example_id) order by example_id, gen_key, sample_index""", [ids]).fetchall():
        verdict = "cut off" if truncated else {True: "correct", False: "wrong", None: "unchecked"}[correct]
        found.setdefault(example, []).append({"text": text, "answer": answer, "reference": reference, "verdict": verdict, "sample": sample})
    return found


def render(data: dict[str, Any]) -> str:
    """The HTML page: the template with the data compressed inline."""
    payload = base64.b64encode(gzip.compress(json.dumps(data, default=str).encode("utf-8"), mtime=0)).decode("ascii")
    page = TEMPLATE.read_text(encoding="utf-8")
    return page.replace("{{title}}", _escape(data["title"])).replace("{{data}}", payload)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_report(workspace: Workspace, name: str | None = None, *, out: str | Path | None = None, token_examples: int = 1000) -> Path:
    target = Path(out) if out else workspace.root / "reports" / f"{name or 'workspace'}.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(target, render(collect(workspace, name, token_examples=token_examples)))
    return target
