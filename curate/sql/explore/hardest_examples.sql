-- name: hardest_examples
-- description: the pool examples the scored model finds hardest (highest mean NLL over response tokens),
--   with their mean entropy and, where `curate score --ifd` ran, the IFD ratio.
-- grain: one row per (example, scoring run)
-- parameters: none (edit the limit to see more)
-- output: example_id, model, n_response_tokens, mean_nll, ppl, mean_entropy, ifd, question

with scored as (
    select * from sample_scores
),

pool as (
    select example_id, messages[1].content as question from examples where split = 'pool'
),

final as (
    select
        scored.example_id,
        scored.model,
        scored.n_response_tokens,
        round(scored.mean_nll, 3) as mean_nll,
        round(scored.ppl, 2) as ppl,
        round(scored.mean_entropy, 3) as mean_entropy,
        round(scored.ifd, 3) as ifd,
        pool.question
    from scored
    join pool using (example_id)
)

select * from final order by mean_nll desc limit 10
