-- name: ppl_band
-- description: the examples with the lowest (min), middle (mid) or highest (max) perplexity of the
--   response under the scoring model: the perplexity baselines.
-- grain: one row per selected example
-- parameters:
--   score_key (score_run): the scoring run (sample_scores.score_key)
--   band (text) = mid: min, mid or max
--   fraction (float) = 0.1: share of the scored examples to keep
--   split (text) = pool: which split to draw from
-- needs: scores
-- output: example_id, ppl, n_response_tokens, bucket

with band as (
    select case when $band in ('min', 'mid', 'max') then $band else error('band must be min, mid or max, got ' || $band) end as name
),

scored as (
    select s.example_id, s.ppl, s.n_response_tokens
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
                    when 'min' then ppl
                    when 'max' then -ppl
                    when 'mid' then abs(percent_rank_ppl - 0.5)
                end,
                example_id
        ) as position,
        count(*) over () as n_scored
    from (select *, percent_rank() over (order by ppl) as percent_rank_ppl from scored)
),

final as (
    select example_id, ppl, n_response_tokens, 'ppl_' || $band as bucket
    from ranked
    where position <= ceil($fraction * n_scored)
)

select * from final order by example_id
