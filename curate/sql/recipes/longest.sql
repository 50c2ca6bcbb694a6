-- name: longest
-- description: the examples with the longest responses (in the scoring model's tokens): the
--   "longest is best" baseline.
-- grain: one row per selected example
-- parameters:
--   score_key (score_run): the scoring run whose sample_scores give n_response_tokens
--   fraction (float) = 0.1: share of the scored examples to keep
--   split (text) = pool: which split to draw from
-- needs: scores
-- output: example_id, n_response_tokens, bucket

with scored as (
    select s.example_id, s.n_response_tokens
    from sample_scores s
    join examples e using (example_id)
    where s.score_key = $score_key and e.split = $split
),

ranked as (
    select *, row_number() over (order by n_response_tokens desc, example_id) as position, count(*) over () as n_scored
    from scored
),

final as (
    select example_id, n_response_tokens, 'longest' as bucket
    from ranked
    where position <= ceil($fraction * n_scored)
)

select * from final order by example_id
