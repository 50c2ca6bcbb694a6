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
--   score_key (score_run): the scoring run (sample_scores and token_scores)
--   r_sample (float) = 0.25: share of the examples kept (Q2 and Q4 together, at most)
--   r_token (float) = 0.5: share of response tokens kept in Q2 examples
--   smoothing (float) = 0.5: lambda, the neighbours' weight in the token score
--   split (text) = pool: which split to draw from
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

-- list functions per example instead of one row per token (as in eksft_offline): the same ranks, far less work
responses as (
    select
        *,
        list_filter(generate_series(1, len(token_ids)), lambda i: is_response[i]) as response_pos,
        len(is_response) - list_position(list_reverse(is_response), true) + 1 as end_of_turn
    from q2_scores
),

perplexities as (
    -- ppl of each response token, in order; neighbours are the previous and next response tokens
    select *, list_transform(response_pos, lambda i: exp(-logprob[i])) as ppl
    from responses
),

smoothed as (
    select
        *,
        list_transform(generate_series(1, len(ppl)), lambda j:
            (1 - $smoothing) * ppl[j]
            + $smoothing * ((case when j > 1 then ppl[j - 1] else ppl[j] end) + (case when j < len(ppl) then ppl[j + 1] else ppl[j] end))
        ) as token_score
    from perplexities
),

kept_tokens as (
    select
        *,
        -- the ceil(r_token x n) lowest scores, ties to the earlier token: sort (score, position)
        list_transform(
            list_grade_up(list_transform(generate_series(1, len(token_score)), lambda j: {'v': token_score[j], 'p': j}))[1:ceil($r_token * len(token_score))::integer],
            lambda j: response_pos[j]
        ) as kept_pos
    from smoothed
),

masks as (
    select
        example_id,
        list_transform(generate_series(1, len(is_response)), lambda i:
            case
                when not is_response[i] then 0
                when i = end_of_turn or list_contains(kept_pos, i) then 1
                else 0
            end
        )::tinyint[] as loss_mask
    from kept_tokens
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
