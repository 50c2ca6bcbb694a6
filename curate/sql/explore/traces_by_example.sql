-- name: traces_by_example
-- description: for each example with teacher traces, how many were generated and correct, and the one
--   best-of-n chose (its answer, length, and whether it was cut off by max tokens).
-- grain: one row per (example, generation run, best-of-n rule)
-- parameters: none
-- output: example_id, gen_key, rule, n_candidates, n_correct, reference_answer, chosen_answer, is_correct,
--   truncated, n_completion_tokens, trace_start

with best as (
    select * from best_traces
),

traces as (
    select trace_id, reference_answer, extracted_answer from traces
),

final as (
    select
        best.example_id,
        best.gen_key,
        best.rule,
        best.n_candidates,
        best.n_correct,
        traces.reference_answer,
        traces.extracted_answer as chosen_answer,
        best.is_correct,
        best.truncated,
        best.n_completion_tokens,
        left(replace(best.text, chr(10), ' '), 50) as trace_start
    from best
    join traces using (trace_id)
)

select * from final order by example_id, gen_key, rule
