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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.workspace import Workspace, write_atomic_parquet, write_atomic_text
from train.chat_tokens import template_hash, tokenize_chat

FORMATS = ("trl", "axolotl", "llamafactory", "jsonl")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def read_selection(workspace: Workspace, name: str) -> tuple[pa.Table, dict[str, Any]]:
    folder = workspace.table_dir(f"selections/{name}")
    if not workspace.has_table(f"selections/{name}"):
        known = sorted(p.name for p in workspace.table_dir("selections").glob("*") if p.is_dir()) if workspace.table_dir("selections").is_dir() else []
        raise FileNotFoundError(f"no selection {name!r} in {workspace.root} (selections: {', '.join(known) or 'none'}; make one with curate select)")
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return pq.read_table([str(p) for p in workspace.parts(f"selections/{name}")]), manifest


def export(workspace: Workspace, name: str, fmt: str, *, out: str | Path | None = None, model: str | None = None,
           drop_masks: bool = False) -> Path:
    """Write the selection ``name`` in format ``fmt``; returns the folder written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    table, manifest = read_selection(workspace, name)
    rows = table.to_pylist()
    masked = any(r.get("loss_mask") is not None for r in rows)
    target = Path(out) if out else workspace.root / "exports" / name / fmt
    target.mkdir(parents=True, exist_ok=True)
    tokenized = fmt == "axolotl" or (fmt == "trl" and masked)
    if masked and not tokenized and not drop_masks:
        raise ValueError(f"selection {name!r} has token masks, which the {fmt} format cannot hold; export to trl or "
                         "axolotl (tokenized, masks kept), or pass --drop-masks to train on whole responses")
    if tokenized:
        tokenizer = _tokenizer(model, manifest, name)
        columns = _tokenized(rows, tokenizer, with_attention=fmt == "axolotl")
        write_atomic_parquet(pa.table(columns), target / "train.parquet")
        if fmt == "axolotl":
            write_atomic_text(target / "axolotl.yml", f"datasets:\n  - path: {target / 'train.parquet'}\n    ds_type: parquet\n"
                              "# pre-tokenized (input_ids, attention_mask, labels): no `type`, so axolotl uses the columns as they are\n")
    elif fmt == "llamafactory":
        records = [_sharegpt(r["messages"]) for r in rows]
        write_atomic_text(target / "train.json", json.dumps(records, ensure_ascii=False, indent=1) + "\n")
        info = {name: {"file_name": "train.json", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "system": "system"},
                       "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}
        write_atomic_text(target / "dataset_info.json", json.dumps(info, indent=2) + "\n")
    else:  # jsonl, and trl without masks: the conversation itself
        lines = [json.dumps({"messages": r["messages"]}, ensure_ascii=False) for r in rows]
        write_atomic_text(target / "train.jsonl", "\n".join(lines) + "\n")
    write_atomic_text(target / "export.json", json.dumps({"selection": name, "format": fmt, "rows": len(rows),
                                                          "masked_rows": sum(r.get("loss_mask") is not None for r in rows),
                                                          "drop_masks": drop_masks, "model": model,
                                                          "selection_sql_hash": manifest.get("sql_hash")}, indent=2) + "\n")
    return target


def _tokenizer(model: str | None, manifest: dict[str, Any], name: str) -> Any:
    from transformers import AutoTokenizer

    from curate.models import resolve

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
