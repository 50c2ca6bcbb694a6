"""``curate export``: a selection in the formats other trainers load without glue code.

- ``jsonl``: plain chat JSONL, one ``{"messages": [...]}`` per line.
- ``trl``: TRL's conversational format (``messages``, ``train.jsonl``) when the selection has no token masks;
  with masks, pre-tokenized ``input_ids`` + ``labels`` (``train.parquet``; -100 where the mask is 0; TRL's
  collator uses ``labels`` as given) for every row: rows without a mask get the default one (assistant
  content + end-of-turn).
- ``axolotl``: pre-tokenized ``input_ids``, ``attention_mask``, ``labels`` and nothing else (axolotl takes
  such a dataset with no ``type``, and its packing collator concatenates every column it finds), plus an
  ``axolotl.yml`` snippet naming ``train.parquet`` relative to the export folder.
- ``llamafactory``: ShareGPT-style JSON and the ``dataset_info.json`` entry that registers it; the entry
  declares a ``system`` column only when some record has one. ShareGPT holds one system prompt, before the
  first turn, and strictly alternating user / assistant turns ending with the assistant: a conversation with
  a later system message (or any other shape LLaMA-Factory's converter would skip) is refused, naming the
  example, never dropped.
Token masks cannot be written in the chat formats (jsonl, llamafactory, trl without tokens): exporting a
masked selection to them is refused unless ``drop_masks`` says to train on whole responses instead.
Tokenized formats need the model's tokenizer; its chat template must be the one the masks were made with.

Every export also writes ``rows.parquet`` (row number in the training file, ``example_id``, the source file
and row it was ingested from), so the trainer-facing file carries only what the trainer reads and every
row can still be traced back; ``export.json`` and the dataset card (``README.md``) list exactly the files
written and their columns (the card's ``configs`` name the training file, so ``datasets.load_dataset``
opens the folder; ``rows.parquet`` is read by file).

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
ROWS_FILE = "rows.parquet"

FORMATS = ("trl", "axolotl", "llamafactory", "jsonl")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
ROWS_SCHEMA = pa.schema([("row", pa.int64()), ("example_id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64())])


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
    records = [_sharegpt(r["example_id"], r["messages"]) for r in rows] if fmt == "llamafactory" else None
    con = connect(workspace)
    lineage = _lineage(con, rows)
    spec = {"selection": name, "selection_key": manifest.get("key"), "format": fmt, "model": model, "drop_masks": drop_masks}
    with workspace.writing(), recorded_run(workspace.root, "export", run_key(spec), models=[name],
                                           parameters={**spec, "out": str(target)}) as record:
        with staged_directory(target) as staging:
            files = _write(staging, fmt, name, rows, columns, records)
            write_atomic_parquet(lineage, staging / ROWS_FILE)
            files[ROWS_FILE] = lineage.column_names
            write_atomic_text(staging / EXPORT_RECORD, json.dumps({
                "selection": name, "format": fmt, "rows": len(rows), "masked_rows": sum(r.get("loss_mask") is not None for r in rows),
                "drop_masks": drop_masks, "model": model, "selection_sql_hash": manifest.get("sql_hash"),
                "selection_key": manifest.get("key"), "files": files}, indent=2) + "\n")
            write_atomic_text(staging / "README.md", dataset_card(con, workspace, name, fmt, manifest, rows, columns, model, files))
        record.counts = {"rows": len(rows)}
    return target


def _write(folder: Path, fmt: str, name: str, rows: list[dict[str, Any]], columns: dict[str, list] | None,
           records: list[dict[str, Any]] | None) -> dict[str, list[str]]:
    """The format's files, into ``folder``; returns each training or config file written with its columns
    (the first one is the file a trainer reads)."""
    if columns is not None:
        write_atomic_parquet(pa.table(columns), folder / "train.parquet")
        files = {"train.parquet": list(columns)}
        if fmt == "axolotl":  # axolotl reads a relative path from the folder it runs in
            write_atomic_text(folder / "axolotl.yml", "# run axolotl from this folder (or make the path absolute)\n"
                              "datasets:\n  - path: train.parquet\n    ds_type: parquet\n"
                              "# pre-tokenized (input_ids, attention_mask, labels): no `type`, so axolotl uses the columns as they are\n")
            files["axolotl.yml"] = []
        return files
    if fmt == "llamafactory":
        assert records is not None
        write_atomic_text(folder / "train.json", json.dumps(records, ensure_ascii=False, indent=1) + "\n")
        has_system = any("system" in r for r in records)
        info = {name: {"file_name": "train.json", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", **({"system": "system"} if has_system else {})},
                       "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}
        write_atomic_text(folder / "dataset_info.json", json.dumps(info, indent=2) + "\n")
        return {"train.json": ["conversations", *(["system"] if has_system else [])], "dataset_info.json": []}
    # jsonl, and trl without masks: the conversation itself
    lines = [json.dumps({"messages": r["messages"]}, ensure_ascii=False) for r in rows]
    write_atomic_text(folder / "train.jsonl", "\n".join(lines) + "\n")
    return {"train.jsonl": ["messages"]}


def _lineage(con: Any, rows: list[dict[str, Any]]) -> pa.Table:
    """``rows.parquet``: each training row's number, example id and where it was ingested from."""
    ids = [r["example_id"] for r in rows]
    origin = dict((e, (f, int(n) if n is not None else None)) for e, f, n in con.execute(
        "select example_id, json_extract_string(meta, '$.origin.file'), json_extract(meta, '$.origin.row')::bigint "
        "from examples where list_contains(?, example_id)", [ids]).fetchall())
    return pa.Table.from_pylist([{"row": i, "example_id": e, "source_file": origin.get(e, (None, None))[0],
                                  "source_row": origin.get(e, (None, None))[1]} for i, e in enumerate(ids)], schema=ROWS_SCHEMA)


READING = {
    "messages": "a list of {role, content}: the conversation, in the chat formats TRL's SFTTrainer and LLaMA-Factory read",
    "conversations": "ShareGPT turns {from, value} (LLaMA-Factory, `formatting: sharegpt`)",
    "system": "the conversation's system prompt, where it has one (LLaMA-Factory's `system` column; absent: the template's default)",
    "input_ids": "the token ids, made with the scoring model's tokenizer and chat template",
    "labels": "the token ids to train on, -100 where the loss is masked (TRL's and axolotl's collators keep them)",
    "attention_mask": "1 for every token (axolotl)",
    "row": "the row's position in the training file",
    "example_id": "the example's content hash in the curate workspace",
    "source_file": "the file the example was ingested from",
    "source_row": "its row in that file",
}


def dataset_card(con: Any, workspace: Workspace, name: str, fmt: str, manifest: dict[str, Any], rows: list[dict[str, Any]],
                 columns: dict[str, list] | None, model: str | None, files: dict[str, list[str]]) -> str:
    """A Hugging Face dataset card (README.md with its YAML header) for an export: where the rows came from,
    the recipe and its parameters, the scoring model's fingerprint, counts, the files written and how a
    trainer reads their columns."""
    import yaml

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
    else:
        trained = sum(int(r.get("n_response_tokens") or 0) for r in rows) or None
    data_file = next(iter(files))
    header = {
        "pretty_name": f"curate selection {name}",
        "tags": ["curate", "sft", "data-selection"],
        "task_categories": ["text-generation"],
        # the training file only: datasets reads every config of a folder with one builder (json or parquet)
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}],
        "curate": {
            "selection": name, "format": fmt, "recipe": manifest.get("recipe"), "recipe_sql_hash": manifest.get("sql_hash"),
            "selection_key": manifest.get("key"), "parameters": manifest.get("parameters"),
            "score_models": [{"model": m, "fingerprint": h, "dtype": d} for m, h, d in scorers],
            "tokenizer": model, "source_files": sources, "rows": len(rows),
            "masked_rows": sum(r.get("loss_mask") is not None for r in rows), "trained_response_tokens": trained,
            "files": files,
        },
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {name}", "",
             f"A training set chosen by the curate recipe `{manifest.get('recipe')}` (SQL hash `{manifest.get('sql_hash')}`) "
             f"from {', '.join(sources) or 'the workspace examples'}: {len(rows):,} rows"
             + (f", {trained:,} response tokens to train on (token masks included)" if trained else "") + ".", "",
             "## Files, their columns and how a trainer reads them", ""]
    for file, names in files.items():
        role = ("the training rows" if file == data_file else "each training row's example id and origin" if file == ROWS_FILE
                else "the trainer's registration of the training file")
        lines += [f"`{file}`: {role}", ""] + [f"- `{column}`: {READING.get(column, 'carried from the selection')}" for column in names]
        lines += [""]
    lines += ["## Parameters", "", "```json", json.dumps(manifest.get("parameters"), indent=2, default=str), "```", "",
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
    """The trainer's columns only (``example_id`` goes to ``rows.parquet``)."""
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
    columns: dict[str, list] = {"input_ids": input_ids}
    if with_attention:
        columns["attention_mask"] = [[1] * len(ids) for ids in input_ids]
    columns["labels"] = labels
    return columns


def _sharegpt(example_id: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """A ShareGPT record: an optional first system prompt in ``system``, then turns that alternate human / gpt
    and end with gpt, the only shape LLaMA-Factory's converter keeps (it skips any other row with a warning)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] == "system":
            raise ValueError(f"example {example_id}: message {i + (system is not None)} is a system message after the first turn, "
                             "which ShareGPT (llamafactory) cannot hold; export to jsonl or trl (they keep every message), or "
                             "leave such rows out in the recipe (e.g. `where len(list_filter(messages[2:], lambda m: m.role = 'system')) = 0`)")
        if message["role"] != expected:
            raise ValueError(f"example {example_id}: message {i + (system is not None)} is from {message['role']!r} where ShareGPT "
                             f"(llamafactory) needs {expected!r} (turns must alternate user / assistant); export to jsonl or trl instead")
    if len(turns) % 2:
        raise ValueError(f"example {example_id}: the conversation ends with a user turn, which ShareGPT (llamafactory) cannot train on")
    return {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in turns],
            **({"system": system} if system is not None else {})}
