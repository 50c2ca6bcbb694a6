"""Arrow tables for scores (``token_scores``, ``pair_scores``), built from numpy arrays with offsets (no
per-token Python objects), and the SQL that rebuilds ``sample_scores`` from ``token_scores``."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from curate.kernel.chat_tokens import ChatTokens
from curate.store import schema
from curate.store.sql import connect
from curate.store.workspace import PART_SUFFIX, Workspace, write_atomic_parquet


def _offsets(lengths: Sequence[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), type=pa.int32())


def _row_starts(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def list_column(per_row: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """list<value_type> from one array per row."""
    values = np.concatenate(per_row) if per_row else np.empty(0)
    return pa.ListArray.from_arrays(_offsets([len(a) for a in per_row]), pa.array(values, type=value_type))


def scored_column(per_row: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """list<value_type> of n values from n-1 scores per row: element 0 (the first token) is null, and so is a
    NaN (a signal the run does not have, such as entropy from a server's top-k)."""
    if not per_row:
        return pa.array([], type=pa.list_(value_type))
    lengths = [len(a) + 1 for a in per_row]
    values = np.concatenate([np.concatenate([[0], a]) for a in per_row]).astype(np.float64)
    mask = np.isnan(values)
    mask[_row_starts(lengths)] = True
    return pa.ListArray.from_arrays(_offsets(lengths), pa.array(values, type=value_type, mask=mask))


def top_column(per_row: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """list<list<value_type>> from one [n-1, k] array per row; token 0's inner list is null."""
    if not per_row:
        return pa.array([], type=pa.list_(pa.list_(value_type)))
    k = per_row[0].shape[1]
    lengths = [a.shape[0] + 1 for a in per_row]
    inner_values = np.concatenate([a.reshape(-1) for a in per_row])
    inner_lengths = np.concatenate([np.concatenate([[0], np.full(a.shape[0], k)]) for a in per_row])
    inner_mask = np.zeros(len(inner_lengths), dtype=bool)
    inner_mask[_row_starts(lengths)] = True
    inner = pa.ListArray.from_arrays(
        _offsets(inner_lengths.astype(np.int64)), pa.array(inner_values, type=value_type), mask=pa.array(inner_mask)
    )
    return pa.ListArray.from_arrays(_offsets(lengths), inner)


def table_from_columns(columns: dict[str, Any], table_schema: pa.Schema) -> pa.Table:
    arrays = [columns[f.name] if isinstance(columns[f.name], pa.Array) else pa.array(columns[f.name], type=f.type) for f in table_schema]
    return pa.Table.from_arrays(arrays, schema=table_schema)


# One row per (example, score key) even if token rows were doubled by an old bug (curate verify reports those).
# IFD compares the last reply's NLL inside the conversation with the same reply scored alone; for a
# single-turn example the last reply is the whole response.
SAMPLE_SCORES_SQL = """
with token_rows as (
    select *
    from token_scores
    where score_key = $score_key
    qualify row_number() over (partition by example_id, variant order by n_tokens desc) = 1
),

chat as (
    select
        example_id, score_key, model, n_tokens, truncated,
        list_where(logprob, is_response) as response_logprob,
        list_where(entropy, is_response) as response_entropy,
        list_where(logprob, list_transform(is_response, lambda r, i: r and not coalesce(is_end_of_turn[i], false))) as content_logprob,
        list_where(entropy, list_transform(is_response, lambda r, i: r and not coalesce(is_end_of_turn[i], false))) as content_entropy,
        list_where(logprob, list_transform(is_response, lambda r, i:
            r and message_index[i] = list_max(list_where(message_index, is_response)))) as last_reply_logprob
    from token_rows
    where variant = 'chat'
),

response_only as (
    select example_id, -list_avg(list_where(logprob, is_response)) as mean_nll_response_only
    from token_rows
    where variant = 'response_only'
),

final as (
    select
        chat.example_id,
        chat.score_key,
        chat.model,
        chat.n_tokens,
        len(chat.response_logprob)::integer as n_response_tokens,
        chat.truncated,
        -list_avg(chat.response_logprob) as mean_nll,
        exp(-list_avg(chat.response_logprob)) as ppl,
        list_avg(chat.response_entropy) as mean_entropy,
        -list_sum(chat.response_logprob) as sum_nll,
        len(chat.content_logprob)::integer as n_content_tokens,
        -list_avg(chat.content_logprob) as mean_nll_content,
        list_avg(chat.content_entropy) as mean_entropy_content,
        response_only.mean_nll_response_only,
        (-list_avg(chat.last_reply_logprob)) / nullif(response_only.mean_nll_response_only, 0) as ifd
    from chat
    left join response_only using (example_id)
)

select * from final order by example_id
"""


def token_scores_table(run: dict[str, Any], example_ids: Sequence[str], tokens: Sequence[ChatTokens], truncated: Sequence[bool],
                       signals: Sequence[Any]) -> pa.Table:
    """``token_scores`` rows: ``run`` holds the columns every row of one scoring run shares (score_key, variant,
    model, model_hash, dtype, engine, engine_version, template_hash, top_k, signals); each row its example's
    tokens and their signals (``logprob``, ``entropy`` (None: the run has none), ``top_ids``, ``top_logprobs``:
    one value per token after the first)."""
    n = len(example_ids)
    columns = {name: [value] * n for name, value in run.items()}
    columns |= {
        "example_id": list(example_ids),
        "n_tokens": [len(t) for t in tokens],
        "truncated": list(truncated),
        "token_ids": list_column([np.asarray(t.token_ids) for t in tokens], pa.int32()),
        "message_index": list_column([np.asarray(t.message_index) for t in tokens], pa.int16()),
        "role": pa.array([t.role for t in tokens], type=pa.list_(pa.string())),
        "is_response": list_column([np.asarray(t.is_response, dtype=bool) for t in tokens], pa.bool_()),
        "is_end_of_turn": list_column([np.asarray(t.is_end_of_turn, dtype=bool) for t in tokens], pa.bool_()),
        "logprob": scored_column([s.logprob.numpy() for s in signals], pa.float32()),
        "entropy": scored_column([s.entropy.numpy() if s.entropy is not None else np.full(len(s.logprob), np.nan) for s in signals],
                                 pa.float32()),
        "top_ids": top_column([s.top_ids.numpy() for s in signals], pa.int32()),
        "top_logprobs": top_column([s.top_logprobs.numpy() for s in signals], pa.float32()),
    }
    return table_from_columns(columns, schema.TOKEN_SCORES)


def pair_scores_table(keys: dict[str, str], example_ids: Sequence[str], tokens: Sequence[ChatTokens], signals: Sequence[Any]) -> pa.Table:
    """``pair_scores`` rows: ``keys`` the pair's pair_key, base_key and calibrated_key; each row its example's
    tokens and their ``kl`` and ``log_ratio`` (one value per token after the first)."""
    n = len(example_ids)
    columns = {name: [value] * n for name, value in keys.items()}
    columns |= {
        "example_id": list(example_ids),
        "n_tokens": [len(t) for t in tokens],
        "is_response": list_column([np.asarray(t.is_response, dtype=bool) for t in tokens], pa.bool_()),
        "kl": scored_column([s.kl.numpy() for s in signals], pa.float32()),
        "log_ratio": scored_column([s.log_ratio.numpy() for s in signals], pa.float32()),
    }
    return table_from_columns(columns, schema.PAIR_SCORES)


def rebuild_sample_scores(workspace: Workspace, score_key: str, *, connection: Any = None) -> int:
    """Recompute ``sample_scores`` for one scoring run from its token rows; returns the row count."""
    con = connection or connect(workspace)
    table = con.sql(SAMPLE_SCORES_SQL, params={"score_key": score_key}).to_arrow_table().cast(schema.SAMPLE_SCORES)
    folder = workspace.table_dir("sample_scores")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic_parquet(table, folder / f"{score_key}{PART_SUFFIX}")  # one file per run, replaced whole
    return table.num_rows
