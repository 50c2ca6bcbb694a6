"""``curate export``: a selection in the formats other trainers load without glue code.

- ``jsonl``: plain chat JSONL, one ``{"messages": [...]}`` per line.
- ``trl``: TRL's conversational format (``messages``) when the selection has no token masks; with masks,
  pre-tokenized ``input_ids`` + ``labels`` (-100 where the mask is 0; TRL's collator uses ``labels`` as
  given) for every row: rows without a mask get the default one (assistant content + end-of-turn).
- ``axolotl``: pre-tokenized ``input_ids``, ``attention_mask``, ``labels`` (axolotl takes such a dataset
  with no ``type``), plus an ``axolotl.yml`` snippet pointing at it.
- ``llamafactory``: ShareGPT-style JSON and the ``dataset_info.json`` entry that registers it.
Token masks cannot be written in the chat formats (jsonl, llamafactory, trl without tokens): exporting a
masked selection to them is refused unless ``drop_masks`` says to train on whole responses instead.
Tokenized formats need the model's tokenizer; its chat template must be the one the masks were made with.

Everything is checked before anything is written; the files are written into a staging folder that then
replaces the target folder whole, so an export never leaves files of another format (or of an earlier
export) behind, and a failed export leaves the target as it was. A target folder that holds something other
than a curate export is refused rather than replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.kernel.atomic import staged_directory, write_atomic_text
from curate.kernel.chat_tokens import template_hash, tokenize_chat
from curate.kernel.keys import run_key
from curate.kernel.runs import recorded_run
from curate.models.registry import resolve
from curate.stages.select import read_manifest
from curate.store.sql import connect
from curate.store.workspace import Workspace, write_atomic_parquet

EXPORT_RECORD = "export.json"

FORMATS = ("trl", "axolotl", "llamafactory", "jsonl")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def read_selection(workspace: Workspace, name: str) -> tuple[pa.Table, dict[str, Any]]:
    """A selection's rows and the manifest stored with them."""
    if not workspace.has_table(f"selections/{name}"):
        folder = workspace.table_dir("selections")
        known = sorted(p.name for p in folder.glob("*") if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []
        raise FileNotFoundError(f"no selection {name!r} in {workspace.root} (selections: {', '.join(known) or 'none'}; make one with curate select)")
    table = pq.read_table([str(p) for p in workspace.parts(f"selections/{name}")])
    return table, read_manifest(table)


def export(workspace: Workspace, name: str, fmt: str, *, out: str | Path | None = None, model: str | None = None,
           drop_masks: bool = False) -> Path:
    """Write the selection ``name`` in format ``fmt``; returns the folder written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    table, manifest = read_selection(workspace, name)
    rows = table.to_pylist()
    masked = any(r.get("loss_mask") is not None for r in rows)
    target = Path(out).expanduser().resolve() if out else workspace.root / "exports" / name / fmt
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / EXPORT_RECORD).is_file())):
        raise ValueError(f"--out {target} exists and is not a curate export: pick an empty or new folder (it would be replaced)")
    tokenized = fmt == "axolotl" or (fmt == "trl" and masked)
    if masked and not tokenized and not drop_masks:
        raise ValueError(f"selection {name!r} has token masks, which the {fmt} format cannot hold; export to trl or "
                         "axolotl (tokenized, masks kept), or pass --drop-masks to train on whole responses")
    columns = _tokenized(rows, _tokenizer(model, manifest, name), with_attention=fmt == "axolotl") if tokenized else None
    spec = {"selection": name, "selection_key": manifest.get("key"), "format": fmt, "model": model, "drop_masks": drop_masks}
    with workspace.writing(), recorded_run(workspace.root, "export", run_key(spec), models=[name],
                                           parameters={**spec, "out": str(target)}) as record:
        with staged_directory(target) as staging:
            _write(staging, target, fmt, name, rows, columns)
            write_atomic_text(staging / EXPORT_RECORD, json.dumps({
                "selection": name, "format": fmt, "rows": len(rows), "masked_rows": sum(r.get("loss_mask") is not None for r in rows),
                "drop_masks": drop_masks, "model": model, "selection_sql_hash": manifest.get("sql_hash"),
                "selection_key": manifest.get("key")}, indent=2) + "\n")
            write_atomic_text(staging / "README.md", dataset_card(workspace, name, fmt, manifest, rows, columns, model))
        record.counts = {"rows": len(rows)}
    return target


def _write(folder: Path, target: Path, fmt: str, name: str, rows: list[dict[str, Any]], columns: dict[str, list] | None) -> None:
    """The format's files, into ``folder`` (which becomes ``target``)."""
    if columns is not None:
        write_atomic_parquet(pa.table(columns), folder / "train.parquet")
        if fmt == "axolotl":
            write_atomic_text(folder / "axolotl.yml", f"datasets:\n  - path: {target / 'train.parquet'}\n    ds_type: parquet\n"
                              "# pre-tokenized (input_ids, attention_mask, labels): no `type`, so axolotl uses the columns as they are\n")
    elif fmt == "llamafactory":
        records = [_sharegpt(r["messages"]) for r in rows]
        write_atomic_text(folder / "train.json", json.dumps(records, ensure_ascii=False, indent=1) + "\n")
        info = {name: {"file_name": "train.json", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "system": "system"},
                       "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}
        write_atomic_text(folder / "dataset_info.json", json.dumps(info, indent=2) + "\n")
    else:  # jsonl, and trl without masks: the conversation itself
        lines = [json.dumps({"messages": r["messages"]}, ensure_ascii=False) for r in rows]
        write_atomic_text(folder / "train.jsonl", "\n".join(lines) + "\n")


DATA_FILES = {"trl": "train.parquet", "axolotl": "train.parquet", "llamafactory": "train.json", "jsonl": "train.jsonl"}
READING = {
    "messages": "a list of {role, content}: the conversation, in the chat formats TRL's SFTTrainer and LLaMA-Factory read",
    "conversations": "ShareGPT turns {from, value} (LLaMA-Factory, `formatting: sharegpt`)",
    "input_ids": "the token ids, made with the scoring model's tokenizer and chat template",
    "labels": "the token ids to train on, -100 where the loss is masked (TRL's and axolotl's collators keep them)",
    "attention_mask": "1 for every token (axolotl)",
    "example_id": "the example's content hash in the curate workspace",
}


def dataset_card(workspace: Workspace, name: str, fmt: str, manifest: dict[str, Any], rows: list[dict[str, Any]],
                 columns: dict[str, list] | None, model: str | None) -> str:
    """A Hugging Face dataset card (README.md with its YAML header) for an export: where the rows came from,
    the recipe and its parameters, the scoring model's fingerprint, counts, and how a trainer reads the columns."""
    import yaml


    con = connect(workspace)
    ids = [r["example_id"] for r in rows]
    sources = sorted({s for (s,) in con.execute(
        "select distinct json_extract_string(meta, '$.origin.file') from examples where list_contains(?, example_id)", [ids]).fetchall() if s})
    keys = [str(v) for v in (manifest.get("parameters") or {}).values()]
    scorers = []
    if "token_scores" in workspace.tables():  # the runs its parameters name, else every run that scored its rows
        scorers = con.execute("select distinct model, model_hash, dtype from token_scores where list_contains(?, score_key) order by 2",
                              [keys]).fetchall() or con.execute(
            "select distinct model, model_hash, dtype from token_scores where list_contains(?, example_id) order by 2", [ids]).fetchall()
    if columns is not None:
        trained = sum(sum(1 for label in labels if label != -100) for labels in columns["labels"])
        names = list(columns)
    else:
        trained = sum(int(r.get("n_response_tokens") or 0) for r in rows) or None
        names = {"llamafactory": ["conversations", "system"], "jsonl": ["messages"], "trl": ["messages"]}[fmt]
    header = {
        "pretty_name": f"curate selection {name}",
        "tags": ["curate", "sft", "data-selection"],
        "task_categories": ["text-generation"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES[fmt]}]}],
        "curate": {
            "selection": name, "format": fmt, "recipe": manifest.get("recipe"), "recipe_sql_hash": manifest.get("sql_hash"),
            "selection_key": manifest.get("key"), "parameters": manifest.get("parameters"),
            "score_models": [{"model": m, "fingerprint": h, "dtype": d} for m, h, d in scorers],
            "tokenizer": model, "source_files": sources, "rows": len(rows),
            "masked_rows": sum(r.get("loss_mask") is not None for r in rows), "trained_response_tokens": trained,
        },
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {name}", "",
             f"A training set chosen by the curate recipe `{manifest.get('recipe')}` (SQL hash `{manifest.get('sql_hash')}`) "
             f"from {', '.join(sources) or 'the workspace examples'}: {len(rows):,} rows"
             + (f", {trained:,} response tokens to train on (token masks included)" if trained else "") + ".", "",
             "## Columns and how a trainer reads them", ""]
    lines += [f"- `{column}`: {READING.get(column, 'carried from the selection')}" for column in names]
    lines += ["", "## Parameters", "", "```json", json.dumps(manifest.get("parameters"), indent=2, default=str), "```", "",
              "## The recipe", "", "```sql", (manifest.get("sql") or "").strip(), "```", ""]
    return "\n".join(lines)


def _tokenizer(model: str | None, manifest: dict[str, Any], name: str) -> Any:
    from transformers import AutoTokenizer


    if model is None:
        raise ValueError("tokenized formats need the model's tokenizer: pass --model M (the model the scores came from)")
    tokenizer = AutoTokenizer.from_pretrained(resolve(model))
    expected = manifest.get("template_hashes") or []
    if expected and template_hash(tokenizer) not in expected:
        raise ValueError(f"the chat template of {model} ({template_hash(tokenizer)}) is not the one selection {name!r} "
                         f"was scored with ({', '.join(expected)}): its masks would not line up")
    return tokenizer


def _tokenized(rows: list[dict[str, Any]], tokenizer: Any, *, with_attention: bool) -> dict[str, list]:
    input_ids, labels = [], []
    for row in rows:
        chat = tokenize_chat(tokenizer, row["messages"])
        if row.get("input_ids") is not None and list(row["input_ids"]) != chat.token_ids:
            raise ValueError(f"example {row['example_id']}: the selection's input_ids differ from this tokenizer's; "
                             "export with the model the scores came from")
        mask = row["loss_mask"] if row.get("loss_mask") is not None else chat.is_response
        ids = list(chat.token_ids)
        input_ids.append(ids)
        labels.append([t if keep and i > 0 else -100 for i, (t, keep) in enumerate(zip(ids, mask))])
    columns: dict[str, list] = {"example_id": [r["example_id"] for r in rows], "input_ids": input_ids, "labels": labels}
    if with_attention:
        columns["attention_mask"] = [[1] * len(ids) for ids in input_ids]
    return columns


def _sharegpt(messages: list[dict[str, str]]) -> dict[str, Any]:
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages if m["role"] != "system"]
    return {"conversations": turns, **({"system": system[0]} if system else {})}
