"""Export a selection for other trainers; TRL's own SFTTrainer trains on our TRL export. The trainers' other
loaders (LLaMA-Factory, axolotl) read these exports in tests/test_loaders.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from curate.stages.export import FORMATS, export
from curate.stages.ingest import ingest
from curate.stages.recipes import load_recipe
from curate.stages.select import select
from curate.store.workspace import Workspace

# the first response token of every example is masked out; the rest of the response (and <|im_end|>) trained
MASKED_SQL = """
select
    example_id, token_ids, is_response,
    list_transform(generate_series(1, len(is_response)),
        lambda i: case when is_response[i] and i <> list_position(is_response, true) then 1 else 0 end)::tinyint[] as loss_mask
from token_scores where variant = 'chat'
"""
# every example but those with a system message after the first one (ShareGPT cannot hold those)
SHAREGPT_SQL = "select example_id from examples where len(list_filter(messages[2:], lambda m: m.role = 'system')) = 0"

# multi-turn conversations: a first system prompt or none, unicode, replies that start with spaces or a newline
CONVERSATIONS = [
    [{"role": "system", "content": "Réponds en français, s'il te plaît. 🙂"},
     {"role": "user", "content": "Combien font 2 + 2 ?"}, {"role": "assistant", "content": "  Deux plus deux font 4."},
     {"role": "user", "content": "Et 中文 ?"}, {"role": "assistant", "content": "\n四 (quatre) — ✓"}],
    [{"role": "user", "content": "Say hi three times."}, {"role": "assistant", "content": " hi hi hi"},
     {"role": "user", "content": "  Now once, with two spaces first."}, {"role": "assistant", "content": "  hi"},
     {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome. ½ → ∞"}],
]
# a system message after the first turn: ingest accepts it; ShareGPT (llamafactory) cannot hold it
LATER_SYSTEM = [{"role": "user", "content": "What is 3 * 3?"}, {"role": "assistant", "content": "9"},
                {"role": "system", "content": "From now on answer in words."},
                {"role": "user", "content": "And 4 * 4?"}, {"role": "assistant", "content": " sixteen"}]


def build_workspace(tmp_path: Path, tokenizer_dir: Path) -> Workspace:
    """8 single-turn sums with a system prompt, the multi-turn CONVERSATIONS and LATER_SYSTEM, scored (token
    rows made with the real SmolLM2 tokenizer), and the selections ``whole`` (every row), ``masked`` (every
    row, first response token masked out), ``sharegpt`` (every row ShareGPT can hold) and ``nosystem`` (the
    rows without a system prompt)."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from curate.kernel.chat_tokens import tokenize_chat
    from curate.store import schema

    sums = [{"system": "Be brief.", "prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}.\n#### {2 * i}"} for i in range(1, 9)]
    ws = Workspace(tmp_path / "ws")
    ingest([write_jsonl(tmp_path / "sums.jsonl", sums)], workspace=ws, answer_style="hash", progress=False)
    chats = [{"messages": m} for m in [*CONVERSATIONS, LATER_SYSTEM]]
    ingest([write_jsonl(tmp_path / "chats.jsonl", chats)], workspace=ws, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = pq.read_table([str(p) for p in ws.parts("examples")]).to_pylist()
    token_rows = []
    for example in examples:
        chat = tokenize_chat(tokenizer, example["messages"])
        token_rows.append({"example_id": example["example_id"], "score_key": "k", "variant": "chat", "token_ids": chat.token_ids,
                           "is_response": chat.is_response, "n_tokens": len(chat)})
    full = [{n: r.get(n) for n in schema.TOKEN_SCORES.names} for r in token_rows]
    ws.write_part("token_scores", pa.Table.from_pylist(full, schema=schema.TOKEN_SCORES), schema=schema.TOKEN_SCORES)
    for name, sql in (("masked", MASKED_SQL), ("sharegpt", SHAREGPT_SQL),
                      ("nosystem", "select example_id from examples where len(list_filter(messages, lambda m: m.role = 'system')) = 0")):
        recipe = tmp_path / f"{name}.sql"
        recipe.write_text(sql)
        select(ws, load_recipe(recipe), name=name)
    select(ws, load_recipe("full"), name="whole")
    return ws


@pytest.fixture
def selected(tmp_path: Path, tiny_model_dir: Path) -> tuple[Workspace, Path]:
    return build_workspace(tmp_path, tiny_model_dir), tiny_model_dir


def selection_rows(ws: Workspace, name: str) -> list[dict[str, Any]]:
    return pq.read_table([str(p) for p in ws.parts(f"selections/{name}")]).to_pylist()


def from_sharegpt(record: dict[str, Any]) -> list[dict[str, str]]:
    roles = {"human": "user", "gpt": "assistant"}
    return ([{"role": "system", "content": record["system"]}] if record.get("system") is not None else []) + [
        {"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]


def test_chat_formats(selected) -> None:
    ws, _ = selected
    lines = (export(ws, "whole", "jsonl") / "train.jsonl").read_text().splitlines()
    assert len(lines) == 11 and sum([m["role"] for m in json.loads(line)["messages"]] == ["system", "user", "assistant"] for line in lines) == 8
    folder = export(ws, "sharegpt", "llamafactory")
    records = json.loads((folder / "train.json").read_text())
    assert sum(r.get("system") == "Be brief." and [t["from"] for t in r["conversations"]] == ["human", "gpt"] for r in records) == 8
    assert json.loads((folder / "dataset_info.json").read_text())["sharegpt"]["formatting"] == "sharegpt"
    with pytest.raises(ValueError, match="has token masks"):
        export(ws, "masked", "jsonl")
    assert (export(ws, "masked", "jsonl", drop_masks=True) / "train.jsonl").is_file()


def test_llamafactory_declares_a_system_column_only_when_records_have_one(selected) -> None:
    """Failure 1 of issue 23: dataset_info.json declared `system` for records without one (LLaMA-Factory: KeyError)."""
    ws, _ = selected
    for name, expected in (("nosystem", {"messages": "conversations"}), ("sharegpt", {"messages": "conversations", "system": "system"})):
        folder = export(ws, name, "llamafactory")
        columns = json.loads((folder / "dataset_info.json").read_text())[name]["columns"]
        records = json.loads((folder / "train.json").read_text())
        assert columns == expected, name
        assert {key for r in records for key in r} == set(columns.values()), name  # every declared column is in the records, no other


def test_a_later_system_message_is_refused_in_sharegpt_never_dropped(selected, tmp_path: Path) -> None:
    """Failure 2 of issue 23: a system message after the first turn vanished from the ShareGPT record."""
    ws, _ = selected
    later = next(r["example_id"] for r in selection_rows(ws, "whole") if r["messages"] == LATER_SYSTEM)
    with pytest.raises(ValueError, match=f"example {later}: message 2 is a system message after the first turn"):
        export(ws, "whole", "llamafactory", out=tmp_path / "lf")
    assert not (tmp_path / "lf").exists()
    for fmt in ("jsonl", "trl"):  # the formats that hold every message keep it
        kept = [json.loads(line)["messages"] for line in (export(ws, "whole", fmt) / "train.jsonl").read_text().splitlines()]
        assert LATER_SYSTEM in kept, fmt


def test_axolotl_parquet_holds_only_the_trainer_columns_and_rows_trace_back(selected, tmp_path: Path) -> None:
    """Failure 3 of issue 23: a string example_id column beside the three (axolotl's packing collator fails on it),
    and an axolotl.yml naming the data by absolute path."""
    import shutil

    import yaml

    ws, model = selected
    folder = export(ws, "masked", "axolotl", model=str(model), out=tmp_path / "ax")
    assert pq.read_schema(folder / "train.parquet").names == ["input_ids", "attention_mask", "labels"]
    moved = tmp_path / "elsewhere" / "ax"
    shutil.move(str(folder), moved)  # the snippet still names the data: its path is relative to the folder
    snippet = yaml.safe_load((moved / "axolotl.yml").read_text())
    path = Path(snippet["datasets"][0]["path"])
    assert not path.is_absolute() and (moved / path).is_file()
    rows = pq.read_table(moved / "rows.parquet").to_pylist()
    train = pq.read_table(moved / "train.parquet").to_pylist()
    selection = {r["example_id"]: r for r in selection_rows(ws, "masked")}
    assert [r["row"] for r in rows] == list(range(len(train))) and {r["example_id"] for r in rows} == set(selection)
    assert {r["source_file"] for r in rows} == {str(tmp_path / "sums.jsonl"), str(tmp_path / "chats.jsonl")}
    for lineage, row in zip(rows, train):  # row i of train.parquet is the example rows.parquet names at i
        mask = selection[lineage["example_id"]]["loss_mask"]
        assert row["input_ids"] == selection[lineage["example_id"]]["input_ids"]
        assert len(row["labels"]) == len(row["input_ids"]) == len(row["attention_mask"]) == len(mask)
        assert [label != -100 for label in row["labels"]] == [bool(m) for m in mask]
        assert all(label in (-100, token) for label, token in zip(row["labels"], row["input_ids"]))


def test_a_conversational_trl_export_opens_by_folder(selected) -> None:
    """Failure 4 of issue 23: the card named train.parquet where an unmasked trl export writes train.jsonl, so
    datasets.load_dataset(<folder>) raised FileNotFoundError."""
    from datasets import load_dataset

    ws, _ = selected
    folder = export(ws, "whole", "trl")
    assert [r["messages"] for r in load_dataset(str(folder), split="train")] == [r["messages"] for r in selection_rows(ws, "whole")]


def card_header(folder: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((folder / "README.md").read_text(encoding="utf-8").split("---\n")[1])


EXPORTS = [("jsonl", "whole", False), ("trl", "whole", False), ("trl", "masked", True), ("axolotl", "whole", True),
           ("llamafactory", "sharegpt", False)]  # format, selection, needs the tokenizer


@pytest.mark.parametrize("fmt,name,tokenized", EXPORTS)
def test_every_export_describes_exactly_the_files_and_columns_it_writes(selected, fmt: str, name: str, tokenized: bool) -> None:
    """Failure 4 of issue 23: the card's `configs` named train.parquet for an unmasked trl export (train.jsonl):
    datasets.load_dataset(folder) failed. Here every format opens by folder and by its files, with the columns
    export.json and the card list."""
    from datasets import load_dataset

    ws, model = selected
    folder = export(ws, name, fmt, model=str(model) if tokenized else None)
    header, record = card_header(folder), json.loads((folder / "export.json").read_text())
    files = record["files"]
    assert header["curate"]["files"] == files
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, "README.md", "export.json"])
    data_file = next(iter(files))
    assert header["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}]
    n = len(selection_rows(ws, name))
    by_folder = load_dataset(str(folder), split="train")
    for path in (data_file, "rows.parquet"):
        by_file = load_dataset(path.rsplit(".", 1)[-1].replace("jsonl", "json"), data_files=str(folder / path), split="train")
        assert len(by_file) == n and by_file.column_names == files[path], path
    assert len(by_folder) == n and by_folder.column_names == files[data_file]


@pytest.mark.parametrize("fmt", FORMATS)
def test_multi_turn_unicode_system_prompts_and_leading_spaces_survive_every_format(selected, fmt: str) -> None:
    from transformers import AutoTokenizer

    from curate.kernel.chat_tokens import render

    ws, model = selected
    name = "sharegpt" if fmt == "llamafactory" else "whole"
    rows = selection_rows(ws, name)
    folder = export(ws, name, fmt, model=str(model) if fmt == "axolotl" else None)
    ids = [r["example_id"] for r in pq.read_table(folder / "rows.parquet").to_pylist()]
    assert ids == [r["example_id"] for r in rows]
    if fmt == "axolotl":
        tokenizer = AutoTokenizer.from_pretrained(model)
        texts = [tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in pq.read_table(folder / "train.parquet").column("input_ids").to_pylist()]
        assert texts == [render(tokenizer, r["messages"]) for r in rows]
        labels = pq.read_table(folder / "train.parquet").column("labels").to_pylist()
        for row, label in zip(rows, labels):  # every assistant reply is trained, leading spaces included; a reply
            # that starts with a space shares its first token with the header's newline ("\n "), trained with it
            trained = tokenizer.decode([t for t in label if t != -100], clean_up_tokenization_spaces=False)
            replies = "".join("\n?" + re.escape(m["content"] + "<|im_end|>") for m in row["messages"] if m["role"] == "assistant")
            assert re.fullmatch(replies, trained), (trained, row["messages"])
        return
    if fmt == "llamafactory":
        got = [from_sharegpt(r) for r in json.loads((folder / "train.json").read_text(encoding="utf-8"))]
    else:
        got = [json.loads(line)["messages"] for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert got == [r["messages"] for r in rows]
    assert all(c in got for c in CONVERSATIONS) and (LATER_SYSTEM in got) == (fmt != "llamafactory")


def test_an_export_replaces_its_folder_whole_and_writes_nothing_when_it_refuses(selected, tmp_path: Path) -> None:
    ws, model = selected
    out = tmp_path / "out"
    export(ws, "whole", "jsonl", out=out)
    export(ws, "sharegpt", "llamafactory", out=out)  # the same folder, another format
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dataset_info.json", "export.json", "rows.parquet", "train.json"]  # no train.jsonl left
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="has token masks"):
        export(ws, "masked", "jsonl", out=out)
    with pytest.raises(ValueError, match="pass --model"):
        export(ws, "masked", "axolotl", out=out)
    with pytest.raises(ValueError, match="system message after the first turn"):
        export(ws, "whole", "llamafactory", out=out)
    assert sorted(p.name for p in out.iterdir()) == before  # refused before writing anything
    assert not (ws.root / "exports").exists() and not list(tmp_path.glob(".out*"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="is not a curate export"):
        export(ws, "whole", "jsonl", out=mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.model
def test_trl_sft_trainer_trains_on_our_export(selected, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    ws, model_dir = selected
    folder = export(ws, "masked", "trl", model=str(model_dir))
    dataset = Dataset.from_parquet(str(folder / "train.parquet"))
    assert dataset.column_names == ["input_ids", "labels"]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=dataset)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row in range(2):  # TRL's collator keeps our labels: -100 exactly where the selection's mask is 0
        n = len(dataset[row]["labels"])
        assert batch["labels"][row, :n].tolist() == dataset[row]["labels"]
    result = trainer.train()
    assert result.global_step == 3 and result.training_loss > 0
