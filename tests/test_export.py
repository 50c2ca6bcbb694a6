"""Export a selection for other trainers; TRL's own SFTTrainer trains on our TRL export."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from curate.stages.export import export
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


@pytest.fixture
def selected(tmp_path: Path, tiny_model_dir: Path) -> tuple[Workspace, Path]:
    from transformers import AutoTokenizer

    import pyarrow as pa

    from curate.store import schema
    from curate.kernel.chat_tokens import tokenize_chat

    rows = [{"system": "Be brief.", "prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}.\n#### {2 * i}"} for i in range(1, 9)]
    ws = Workspace(tmp_path / "ws")
    ingest([write_jsonl(tmp_path / "sums.jsonl", rows)], workspace=ws, answer_style="hash", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = pq.read_table([str(p) for p in ws.parts("examples")]).to_pylist()
    token_rows = []
    for example in examples:
        chat = tokenize_chat(tokenizer, example["messages"])
        token_rows.append({"example_id": example["example_id"], "score_key": "k", "variant": "chat", "token_ids": chat.token_ids,
                           "is_response": chat.is_response, "n_tokens": len(chat)})
    full = [{n: r.get(n) for n in schema.TOKEN_SCORES.names} for r in token_rows]
    ws.write_part("token_scores", pa.Table.from_pylist(full, schema=schema.TOKEN_SCORES), schema=schema.TOKEN_SCORES)
    recipe = tmp_path / "masked.sql"
    recipe.write_text(MASKED_SQL)
    select(ws, load_recipe(recipe), name="masked")
    select(ws, load_recipe("full"), name="whole")
    return ws, tiny_model_dir


def test_chat_formats(selected) -> None:
    ws, _ = selected
    lines = (export(ws, "whole", "jsonl") / "train.jsonl").read_text().splitlines()
    assert len(lines) == 8 and [m["role"] for m in json.loads(lines[0])["messages"]] == ["system", "user", "assistant"]
    folder = export(ws, "whole", "llamafactory")
    record = json.loads((folder / "train.json").read_text())[0]
    assert record["system"] == "Be brief." and [t["from"] for t in record["conversations"]] == ["human", "gpt"]
    assert json.loads((folder / "dataset_info.json").read_text())["whole"]["formatting"] == "sharegpt"
    with pytest.raises(ValueError, match="has token masks"):
        export(ws, "masked", "jsonl")
    assert (export(ws, "masked", "llamafactory", drop_masks=True) / "train.json").is_file()


def test_tokenized_formats_keep_the_masks(selected) -> None:
    ws, model = selected
    with pytest.raises(ValueError, match="pass --model"):
        export(ws, "masked", "trl")
    table = pq.read_table(export(ws, "masked", "axolotl", model=str(model)) / "train.parquet").to_pylist()
    selection = {r["example_id"]: r for r in pq.read_table([str(p) for p in ws.parts("selections/masked")]).to_pylist()}
    for row in table:
        mask = selection[row["example_id"]]["loss_mask"]
        assert len(row["labels"]) == len(row["input_ids"]) == len(row["attention_mask"]) == len(mask)
        assert [label != -100 for label in row["labels"]] == [bool(m) for m in mask]
        assert all(label in (-100, token) for label, token in zip(row["labels"], row["input_ids"]))


def test_an_export_replaces_its_folder_whole_and_writes_nothing_when_it_refuses(selected, tmp_path: Path) -> None:
    ws, model = selected
    out = tmp_path / "out"
    export(ws, "whole", "jsonl", out=out)
    export(ws, "whole", "llamafactory", out=out)  # the same folder, another format
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dataset_info.json", "export.json", "train.json"]  # no train.jsonl left
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="has token masks"):
        export(ws, "masked", "jsonl", out=out)
    with pytest.raises(ValueError, match="pass --model"):
        export(ws, "masked", "axolotl", out=out)
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
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=dataset)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row in range(2):  # TRL's collator keeps our labels: -100 exactly where the selection's mask is 0
        n = len(dataset[row]["labels"])
        assert batch["labels"][row, :n].tolist() == dataset[row]["labels"]
    result = trainer.train()
    assert result.global_step == 3 and result.training_loss > 0
