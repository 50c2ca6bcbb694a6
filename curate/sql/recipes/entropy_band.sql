-- name: entropy_band
-- description: the examples with the lowest (min) or highest (max) mean token entropy over the response
--   under the scoring model: the entropy baselines.
-- grain: one row per selected example
-- parameters:
--   score_key (score_run): the scoring run (sample_scores.score_key)
--   band (text) = max: min or max
--   fraction (float) = 0.1: share of the scored examples to keep
--   split (text) = pool: which split to draw from
-- needs: scores, entropy
-- output: example_id, mean_entropy, n_response_tokens, bucket

with band as (
    select case when $band in ('min', 'max') then $band else error('band must be min or max, got ' || $band) end as name
),

scored as (
    select s.example_id, s.mean_entropy, s.n_response_tokens
    from sample_scores s
    join examples e using (example_id)
    where s.score_key = $score_key and e.split = $split
),

ranked as (
    select
        *,
        row_number() over (
            order by
                case (select name from band)
                    when 'min' then mean_entropy
                    when 'max' then -mean_entropy
                end,
                example_id
        ) as position,
        count(*) over () as n_scored
    from scored
),

final as (
    select example_id, mean_entropy, n_response_tokens, 'entropy_' || $band as bucket
    from ranked
    where position <= ceil($fraction * n_scored)
)

select * from final order by example_id
