-- name: ifd
-- description: the examples with the highest instruction-following difficulty (IFD = response NLL with
--   the instruction / without it), leaving out IFD >= 1 (the instruction does not help at all: usually
--   a mismatched pair), as in Cherry LLM. Needs `curate score --ifd`.
-- grain: one row per selected example
-- parameters:
--   score_key (score_run): the scoring run (sample_scores.score_key) that ran with --ifd
--   fraction (float) = 0.1: share of the scored examples to keep
--   split (text) = pool: which split to draw from
-- needs: scores, ifd
-- output: example_id, ifd, n_response_tokens, bucket

with scored as (
    select s.example_id, s.ifd, s.n_response_tokens
    from sample_scores s
    join examples e using (example_id)
    where s.score_key = $score_key and e.split = $split and s.ifd is not null
),

ranked as (
    select *, row_number() over (order by ifd desc, example_id) as position, count(*) over () as n_scored
    from scored
    where ifd < 1
),

final as (
    select example_id, ifd, n_response_tokens, 'ifd' as bucket
    from ranked
    where position <= ceil($fraction * (select count(*) from scored))
)

select * from final order by example_id
