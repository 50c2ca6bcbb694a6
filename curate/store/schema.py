"""Table contracts between stages: one Arrow schema per workspace table.

Every stage writes exactly these columns, so a later stage (or another tool) can rely on them.
Later stages add their tables here, never in their own modules.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

ROLES = ("system", "user", "assistant")

EXAMPLES = pa.schema(
    [
        ("example_id", pa.string()),  # content hash of the canonical messages (see curate.stages.records)
        ("source", pa.string()),  # file path or built-in source name it came from
        ("split", pa.string()),  # "pool" or "heldout" (deterministic by example_id)
        ("messages", pa.list_(MESSAGE)),
        ("reference_answer", pa.string()),  # nullable: the answer to verify generations against
        ("meta", pa.string()),  # JSON: origin (file, row) and the source fields not used in messages
    ]
)

REJECTS = pa.schema(
    [
        ("reject_id", pa.string()),  # hash of (source file, row, reason): re-ingest adds no duplicates
        ("source_file", pa.string()),
        ("row", pa.int64()),  # 1-based line (JSONL, CSV) or row index + 1 (JSON array, Parquet)
        ("reason", pa.string()),  # short machine-readable code, counted per ingest
        ("detail", pa.string()),  # human-readable explanation
        ("raw", pa.string()),  # the offending record, cut to 2,000 characters
    ]
)

# One row per (example, score_key, variant). Lists are per token of the templated conversation; the
# signals at token t come from the distribution that predicted it (logits at t-1), so element 0 is null.
TOKEN_SCORES = pa.schema(
    [
        ("example_id", pa.string()),
        ("score_key", pa.string()),  # hash of model fingerprint + engine + parameters: one scoring run's identity
        ("variant", pa.string()),  # "chat" (whole conversation) or "response_only" (no instruction; for IFD)
        ("model", pa.string()),  # path or hub id
        ("model_hash", pa.string()),  # config + weights fingerprint
        ("dtype", pa.string()),
        ("engine", pa.string()),
        ("engine_version", pa.string()),
        ("signals", pa.string()),  # exact (full-vocabulary entropy) or logprob-only (a served model's prompt log-probs)
        ("template_hash", pa.string()),  # chat template the token spans were made with
        ("top_k", pa.int32()),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("token_ids", pa.list_(pa.int32())),
        ("message_index", pa.list_(pa.int16())),  # which message each token belongs to (-1: none)
        ("role", pa.list_(pa.string())),
        ("is_response", pa.list_(pa.bool_())),  # assistant content + its end-of-turn token
        ("is_end_of_turn", pa.list_(pa.bool_())),  # the end-of-turn token closing a reply (a response token)
        ("logprob", pa.list_(pa.float32())),
        ("entropy", pa.list_(pa.float32())),  # full-vocabulary, nats
        ("top_ids", pa.list_(pa.list_(pa.int32()))),
        ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    ]
)

# One row per (example, pair_key): two models on the same tokens.
PAIR_SCORES = pa.schema(
    [
        ("example_id", pa.string()),
        ("pair_key", pa.string()),
        ("base_key", pa.string()),  # score_key of the base model's token_scores
        ("calibrated_key", pa.string()),
        ("n_tokens", pa.int32()),
        ("is_response", pa.list_(pa.bool_())),
        ("kl", pa.list_(pa.float32())),  # KL(calibrated ‖ base), full vocabulary, nats; element 0 null
        ("log_ratio", pa.list_(pa.float32())),  # log q_calibrated(token) - log p_base(token); element 0 null
    ]
)

# Aggregates over response tokens, rebuilt from token_scores by SQL (curate/score_sql.py) after each run.
SAMPLE_SCORES = pa.schema(
    [
        ("example_id", pa.string()),
        ("score_key", pa.string()),
        ("model", pa.string()),
        ("n_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("mean_nll", pa.float64()),
        ("ppl", pa.float64()),
        ("mean_entropy", pa.float64()),
        ("sum_nll", pa.float64()),
        ("n_content_tokens", pa.int32()),  # response tokens without the end-of-turn token (what plain-text scoring scores)
        ("mean_nll_content", pa.float64()),  # mean NLL over those
        ("mean_entropy_content", pa.float64()),
        ("mean_nll_response_only", pa.float64()),  # the response scored without its instruction (null if not asked)
        ("ifd", pa.float64()),  # the last reply's mean NLL in the conversation / mean_nll_response_only
    ]
)

# One row per (example, probe_key): the answer-entropy probe of complexity-aware fine-tuning. The model is
# asked for the answer only; the distribution of its first answer token is read at the last prompt position.
PROBE_SCORES = pa.schema(
    [
        ("example_id", pa.string()),
        ("probe_key", pa.string()),  # hash of model fingerprint + engine + template versions
        ("model", pa.string()),
        ("model_hash", pa.string()),
        ("engine", pa.string()),
        ("template", pa.string()),  # numeric, choice, or the user's template file
        ("template_version", pa.string()),  # hash of the template text
        ("n_prompt_tokens", pa.int32()),
        ("entropy", pa.float64()),  # of the first answer token's distribution, full vocabulary, nats
        ("entropy_norm", pa.float64()),  # entropy / log(vocab size); recipes normalise by the data's max(H), as the reference
        ("token_id", pa.int32()),  # the greedy (argmax) first answer token
        ("token_text", pa.string()),
        ("reference_answer", pa.string()),
        ("expected_token_id", pa.int32()),  # first token of the reference answer as the model would write it
        ("is_valid", pa.bool_()),  # the greedy token can start an answer (a digit or sign; an option letter or number)
        ("is_correct", pa.bool_()),  # the greedy token is the reference's first token
        ("category", pa.string()),  # the example's category or subject field (per-category AUC), if it has one
        ("not_sure", pa.bool_()),  # answered "0" to the reference multiple-choice prompt's "not sure" option
    ]
)

# One row per generation request: (example, teacher, template, sampling parameters, sample index).
TRACES = pa.schema(
    [
        ("trace_id", pa.string()),  # hash of the request: the resume key
        ("example_id", pa.string()),
        ("gen_key", pa.string()),  # hash of teacher fingerprint + templates + sampling parameters (all samples)
        ("teacher", pa.string()),  # path or hub id
        ("teacher_hash", pa.string()),  # config + weights fingerprint
        ("engine_version", pa.string()),
        ("dtype", pa.string()),
        ("template", pa.string()),  # numeric, choice, or the user's template file
        ("template_version", pa.string()),  # hash of the template text
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("max_tokens", pa.int32()),
        ("seed", pa.int64()),  # the request's own seed (derived from trace_id and --seed)
        ("sample_index", pa.int32()),
        ("prompt", pa.list_(MESSAGE)),  # the conversation sent to the teacher
        ("text", pa.string()),  # the raw completion
        ("extracted_answer", pa.string()),  # null when none could be found
        ("reference_answer", pa.string()),
        ("is_correct", pa.bool_()),  # null when the example has no reference answer
        ("finish_reason", pa.string()),  # "stop" or "length"
        ("truncated", pa.bool_()),  # cut off by max_tokens
        ("n_prompt_tokens", pa.int32()),
        ("n_completion_tokens", pa.int32()),
    ]
)

# One row per failed generation request (after its retries): its error, for the user; not a trace, so the next
# run sends the request again.
TRACE_ERRORS = pa.schema(
    [
        ("trace_id", pa.string()),
        ("example_id", pa.string()),
        ("gen_key", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("at", pa.float64()),  # unix time
    ]
)

# One row per (example, gen_key, rule): the trace to train on, chosen by best-of-n (curate.stages.best_of_n).
BEST_TRACES = pa.schema(
    [
        ("example_id", pa.string()),
        ("gen_key", pa.string()),
        ("rule", pa.string()),  # shortest or student-logprob
        ("student_key", pa.string()),  # score key of the student model (student-logprob only)
        ("trace_id", pa.string()),
        ("text", pa.string()),
        ("is_correct", pa.bool_()),
        ("truncated", pa.bool_()),
        ("n_completion_tokens", pa.int32()),
        ("student_mean_logprob", pa.float64()),  # mean log-prob of the trace's tokens under the student
        ("n_candidates", pa.int32()),
        ("n_correct", pa.int32()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "examples": EXAMPLES,
    "rejects": REJECTS,
    "token_scores": TOKEN_SCORES,
    "pair_scores": PAIR_SCORES,
    "sample_scores": SAMPLE_SCORES,
    "probe_scores": PROBE_SCORES,
    "traces": TRACES,
    "trace_errors": TRACE_ERRORS,
    "best_traces": BEST_TRACES,
}
