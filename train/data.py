"""Training data: Parquet rows -> token ids, per-token loss masks and per-example weights.

Accepted input: a Parquet file, a folder of Parquet parts (a `curate` table such as ``ws/examples`` or a
selection ``ws/selections/NAME``), any tool's output with the same columns:
- ``messages`` list<struct<role, content>> (required): tokenized with the model's chat template; by
  default the loss covers the assistant content and its end-of-turn token (curate.kernel.chat_tokens);
- ``loss_mask`` list<int or bool> (optional): one entry per token of that tokenization, 1 = train on this
  token (it predicts the token from the ones before it). When present it replaces the default mask;
- ``input_ids`` list<int> (optional): the token ids the mask was made with; checked against our own
  tokenization, so a mask made with another tokenizer or template is refused instead of misapplied;
- ``weight`` float (optional): multiplies every token loss of the example;
- ``stage`` int (optional): which training stage a row belongs to (``train sft --stage N`` keeps those rows).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from curate.kernel.chat_tokens import TemplateError, tokenize_chat

REQUIRED = ("messages",)


class DataError(ValueError):
    pass


@dataclass
class TrainExample:
    example_id: str
    input_ids: list[int]
    targets: list[bool]  # targets[t]: token t is trained on (predicted from tokens < t); targets[0] is False
    end_of_turn: list[bool]  # the end-of-turn tokens that close replies
    weight: float = 1.0

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


@dataclass
class LoadReport:
    rows: int = 0
    truncated: int = 0
    dropped_no_targets: int = 0  # rows left with no trained token after truncation to --max-len

    def summary(self) -> str:
        return (f"{self.rows:,} rows, {self.truncated:,} truncated to --max-len, "
                f"{self.dropped_no_targets:,} dropped (no trained token left after truncation)")


def read_table(path: str | Path, *, split: str | None = None, stage: int | None = None, limit: int | None = None) -> pa.Table:
    """The rows of a Parquet file or folder; ``split`` / ``stage`` keep the rows whose column equals it."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"training data {source} does not exist (give a Parquet file or a folder of parts)")
    files = sorted(str(p) for p in source.rglob("*.parquet")) if source.is_dir() else [str(source)]
    if not files:
        raise DataError(f"{source}: no Parquet files in this folder")
    dataset = ds.dataset(files, format="parquet")  # a curate table folder also holds a manifest.json
    condition = None
    for column, value in (("split", split), ("stage", stage)):
        if value is None:
            continue
        if column not in dataset.schema.names:
            raise DataError(f"{source}: --{column} {value!r} given but the data has no {column!r} column")
        condition = (ds.field(column) == value) if condition is None else condition & (ds.field(column) == value)
    table = dataset.to_table(filter=condition) if condition is not None else dataset.to_table()
    if table.num_rows == 0 and condition is not None:
        raise DataError(f"{source}: no rows with {' and '.join(f'{c} = {v!r}' for c, v in (('split', split), ('stage', stage)) if v is not None)}")
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {table.column_names}. "
                        "Training data needs 'messages' (list of {role, content})")
    if limit is not None:
        table = table.slice(0, limit)
    return table


def sample_fraction(table: pa.Table, fraction: float, *, seed: int) -> pa.Table:
    """A random ``fraction`` of the rows (at least one), reproducible by seed."""
    if not 0 < fraction <= 1:
        raise DataError(f"--fraction must be in (0, 1], got {fraction}")
    count = max(1, round(table.num_rows * fraction))
    chosen = sorted(random.Random(seed).sample(range(table.num_rows), count))
    return table.take(chosen)


SPANS = ("auto", "slot", "content_eot")


def slot_span(is_response: list[bool], is_end_of_turn: list[bool], message_index: list[int]) -> list[bool]:
    """The reply slot as the LLaMA-Factory forks of EKSFT and Q-Tuning label it, ``{content}<|im_end|>\n``: the
    reply's tokens and its end-of-turn token, plus what follows the end-of-turn token inside its own turn (in
    chatml, the newline)."""
    slot = list(is_response)
    for position, closes in enumerate(is_end_of_turn):
        after = position + 1
        while closes and after < len(slot) and message_index[after] == message_index[position]:
            slot[after] = True
            after += 1
    return slot


def load_examples(table: pa.Table, tokenizer: Any, *, max_len: int, source: str,
                  span: str = "content_eot") -> tuple[list[TrainExample], LoadReport]:
    """Tokenize and check every row; a bad mask or tokenizer mismatch is an error naming the row. ``span``:
    which tokens of a reply train where the row has no loss mask (content_eot: the reply and its end-of-turn
    token; slot: also the rest of its turn, as the EKSFT and Q-Tuning forks train)."""
    report = LoadReport(rows=table.num_rows)
    has_mask, has_ids, has_weight = (name in table.column_names for name in ("loss_mask", "input_ids", "weight"))
    ids_column = table.column("example_id").to_pylist() if "example_id" in table.column_names else None
    examples = []
    for index, row in enumerate(table.to_pylist()):
        where = f"{source} row {index + 1}" + (f" (example_id {ids_column[index]})" if ids_column else "")
        try:
            chat = tokenize_chat(tokenizer, row["messages"])
        except (TemplateError, KeyError, TypeError) as err:
            raise DataError(f"{where}: cannot render the messages with the chat template: {err}") from err
        ids, targets, end_of_turn = list(chat.token_ids), list(chat.is_response), list(chat.is_end_of_turn)
        if span == "slot":
            targets = slot_span(targets, end_of_turn, list(chat.message_index))
        if has_ids and row["input_ids"] is not None and list(row["input_ids"]) != ids:
            raise DataError(f"{where}: input_ids differ from this model's tokenization of the messages: the masks were "
                            "made with another tokenizer or chat template; re-make them for this model")
        if has_mask and row["loss_mask"] is not None:
            mask = [bool(v) for v in row["loss_mask"]]
            if len(mask) != len(ids):
                raise DataError(f"{where}: loss_mask has {len(mask)} entries but the tokenized example has {len(ids)} tokens")
            if not any(mask):
                raise DataError(f"{where}: loss_mask is all zero: the example would train nothing; drop the row instead")
            targets = mask
        targets[0] = False  # nothing predicts the first token
        if len(ids) > max_len:
            ids, targets, end_of_turn = ids[:max_len], targets[:max_len], end_of_turn[:max_len]
            report.truncated += 1
        if not any(targets):
            report.dropped_no_targets += 1
            continue
        weight = float(row["weight"]) if has_weight and row["weight"] is not None else 1.0
        examples.append(TrainExample(str(ids_column[index]) if ids_column else str(index), ids, targets, end_of_turn, weight))
    if not examples:
        raise DataError(f"{source}: no trainable rows ({report.summary()})")
    return examples, report
