"""Best-of-n: per example, the one trace to train on, out of the n a teacher generated.

Correct traces come first, then traces with no reference to check against, then wrong ones; complete traces
before ones cut off by ``max_tokens``; then the user's rule:
- ``shortest``: fewest completion tokens (cheapest to train on, least rambling);
- ``student-logprob``: highest mean log-prob of the trace's tokens under the student model (the trace the
  student finds most natural), computed with the scoring engine on the conversation the student will be
  trained on: the example's own messages with the trace as the assistant turn.
The choice is a SQL ranking, rebuilt whole into ``best_traces/<gen_key>-<rule>.parquet`` on every call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from curate.kernel.chat_tokens import TemplateError, tokenize_chat, with_reply
from curate.models.head import token_signals
from curate.store import schema
from curate.store.sql import connect
from curate.store.verify import check_tables
from curate.store.workspace import PART_SUFFIX, Workspace, write_atomic_parquet

if TYPE_CHECKING:
    from curate.models.scorer import Scorer

RULES = ("shortest", "student-logprob")

BEST_TRACES_SQL = """
with candidates as (
    select traces.*, student.student_mean_logprob
    from traces
    left join student using (trace_id)
    where traces.gen_key = $gen_key
),
ranked as (
    select
        *,
        row_number() over (
            partition by example_id
            order by
                case when is_correct then 0 when is_correct is null then 1 else 2 end,  -- correct, unchecked, wrong
                truncated,
                case when $rule = 'shortest' then n_completion_tokens end,
                case when $rule = 'student-logprob' then -student_mean_logprob end nulls last,
                sample_index
        ) as rank,
        count(*) over (partition by example_id) as n_candidates,
        count(*) filter (where is_correct) over (partition by example_id) as n_correct
    from candidates
),
final as (
    select
        example_id, gen_key, $rule as rule, $student_key as student_key, trace_id, text, is_correct, truncated,
        n_completion_tokens, student_mean_logprob, n_candidates::integer as n_candidates, n_correct::integer as n_correct
    from ranked
    where rank = 1
)
select * from final order by example_id
"""


def choose_best(workspace: Workspace, gen_key: str, *, rule: str = "shortest", student: "Scorer | None" = None) -> int:
    """Write the chosen trace per example for one generation run; returns how many examples got one."""

    if rule not in RULES:
        raise ValueError(f"unknown best-of-n rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "student-logprob" and student is None:
        raise ValueError("the student-logprob rule needs a student model (--student M)")
    with workspace.writing():
        con = connect(workspace)
        scores = _student_scores(con, gen_key, student) if rule == "student-logprob" else _no_scores()
        con.register("student", scores)
        student_key = student.key if rule == "student-logprob" and student is not None else None
        table = con.sql(BEST_TRACES_SQL, params={"gen_key": gen_key, "rule": rule, "student_key": student_key}).to_arrow_table()
        table = table.cast(schema.BEST_TRACES)
        folder = workspace.table_dir("best_traces")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{gen_key}-{rule}" + (f"-{student_key}" if student_key else "")
        write_atomic_parquet(table, folder / f"{name}{PART_SUFFIX}")  # one file per (run, rule), replaced whole
    check_tables(workspace, ["best_traces"])
    return table.num_rows


def _no_scores() -> pa.Table:
    return pa.table({"trace_id": pa.array([], pa.string()), "student_mean_logprob": pa.array([], pa.float64())})


def _student_scores(con, gen_key: str, student: "Scorer", batch: int = 64) -> pa.Table:
    """Mean log-prob of each trace's response tokens under the student (example messages, trace as answer)."""
    import torch

    query = """
        select traces.trace_id, traces.text, examples.messages
        from traces join examples using (example_id)
        where traces.gen_key = $gen_key order by traces.trace_id
    """
    ids, means = [], []
    reader = con.sql(query, params={"gen_key": gen_key}).to_arrow_reader(batch)
    for chunk in reader:
        chats, kept = [], []
        for row in chunk.to_pylist():
            try:
                chat = tokenize_chat(student.tokenizer, with_reply(row["messages"], row["text"]))
            except TemplateError:
                continue
            if len(chat) <= student.engine.max_len and row["text"].strip():
                chats.append(chat)
                kept.append(row["trace_id"])
        hidden = student.engine.hidden_states([c.token_ids for c in chats])
        for trace_id, chat, states in zip(kept, chats, hidden):
            signals = token_signals(states.to(student.head.weight.device), torch.tensor(chat.token_ids), student.head, top_k=0)
            response = np.asarray(chat.is_response[1:], dtype=bool)
            ids.append(trace_id)
            means.append(float(signals.logprob.numpy()[response].mean()))
    return pa.table({"trace_id": pa.array(ids, pa.string()), "student_mean_logprob": pa.array(means, pa.float64())})
