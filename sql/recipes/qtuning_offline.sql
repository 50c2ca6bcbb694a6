-- name: qtuning_offline
-- description: Q-Tuning offline (our variant of arXiv 2509.23873): the error-uncertainty plane from one
--   model's sample scores with global quantiles (percent ranks). error = PPL over response tokens, uncertainty = mean
--   token entropy over response tokens (response-only, not every position as in the authors' code).
--   Q2 (misconception: PPL > q(1 - alpha) and H <= q(alpha)) is kept with its tokens pruned; Q4
--   (calibration: PPL <= q(alpha) and H > q(1 - alpha)) is kept whole; Q1 and Q3 are dropped. alpha is the
--   largest of 0.01, 0.02 .. 0.49 that keeps at most r_sample of the examples (the paper bisects alpha per
--   mini-batch and fills a shortfall by |ppl_norm - H_norm|; no fill-up here). Inside each
--   Q2 example, every response token gets s_i = (1 - smoothing) ppl_i + smoothing (ppl_{i-1} + ppl_{i+1})
--   (a missing neighbour counts as the token itself) and the ceil(r_token x n) lowest scores are kept,
--   plus the end-of-turn token. The online version is `train sft --method qtuning`.
-- grain: one row per kept example; Q2 rows carry a token mask
-- parameters:
--   score_key: the scoring run (sample_scores and token_scores)
--   r_sample = 0.25: share of the examples kept (Q2 and Q4 together, at most)
--   r_token = 0.5: share of response tokens kept in Q2 examples
--   smoothing = 0.5: lambda, the neighbours' weight in the token score
--   split = pool: which split to draw from
-- output: example_id, bucket, alpha, ppl, mean_entropy, token_ids, is_response, loss_mask, n_response_tokens

with samples as (
    select s.example_id, s.ppl, s.mean_entropy, s.n_response_tokens
    from sample_scores s
    join examples e using (example_id)
    where s.score_key = $score_key and e.split = $split
),

grid as (
    select alpha / 100.0 as alpha from range(1, 50) r(alpha)  -- 0.01 .. 0.49
),

ranked as (
    select
        *,
        percent_rank() over (order by ppl) as ppl_rank,  -- x > q(1 - alpha) is rank > 1 - alpha
        percent_rank() over (order by mean_entropy) as entropy_rank
    from samples
),

quadrants as (
    select
        grid.alpha,
        ranked.* exclude (ppl_rank, entropy_rank),
        case
            when ppl_rank > 1 - grid.alpha and entropy_rank <= grid.alpha then 'q2'
            when ppl_rank <= grid.alpha and entropy_rank > 1 - grid.alpha then 'q4'
        end as bucket
    from grid, ranked
),

chosen_alpha as (
    -- the widest cut that keeps no more than r_sample of the examples (the paper bisects per mini-batch)
    select coalesce(max(alpha), 0.01) as alpha
    from (
        select alpha, count(bucket) as kept from quadrants group by alpha
    )
    where kept <= $r_sample * (select count(*) from samples)
),

kept as (
    select quadrants.* exclude (alpha), quadrants.alpha
    from quadrants
    join chosen_alpha using (alpha)
    where bucket is not null
),

q2_scores as (
    select t.example_id, t.token_ids, t.is_response, t.logprob
    from token_scores t
    join kept using (example_id)
    where t.score_key = $score_key and t.variant = 'chat' and kept.bucket = 'q2'
),

tokens as (
    select
        example_id,
        unnest(generate_series(1, len(token_ids))) as pos,
        unnest(is_response) as response,
        unnest(logprob) as logprob
    from q2_scores
),

smoothed as (
    select
        example_id,
        pos,
        (1 - $smoothing) * exp(-logprob)
            + $smoothing * (coalesce(lag(exp(-logprob)) over w, exp(-logprob)) + coalesce(lead(exp(-logprob)) over w, exp(-logprob)))
            as token_score,
        count(*) over (partition by example_id) as n_response,
        max(pos) over (partition by example_id) as end_of_turn
    from tokens
    where response
    window w as (partition by example_id order by pos)
),

pruned as (
    select
        example_id,
        pos,
        row_number() over (partition by example_id order by token_score, pos) <= ceil($r_token * n_response)
            or pos = end_of_turn as keep
    from smoothed
),

masks as (
    select
        tokens.example_id,
        list(case when pruned.keep then 1 else 0 end order by tokens.pos)::tinyint[] as loss_mask
    from tokens
    left join pruned using (example_id, pos)
    group by tokens.example_id
),

final as (
    select
        kept.example_id, kept.bucket, kept.alpha, kept.ppl, kept.mean_entropy,
        q2_scores.token_ids, q2_scores.is_response, masks.loss_mask, kept.n_response_tokens
    from kept
    left join q2_scores using (example_id)
    left join masks using (example_id)
)

select * from final order by example_id
