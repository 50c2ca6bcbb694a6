-- name: eksft_offline
-- description: EKSFT offline (our variant of arXiv 2605.29303): per example, of its response tokens, the
--   top `ratio` by entropy under the base model and the top `ratio` by KL(calibrated || base) are masked
--   out of the loss (union, so between k and 2k tokens with k = ceil(ratio x response tokens)). The paper
--   masks online per micro-batch under the model being trained (`train sft --method eksft`); here the
--   mask is fixed ahead of training from a base and a calibrated model. The end-of-turn token is always
--   kept: it teaches the model to stop. Signals of token t come from the logits that predicted it.
-- grain: one row per example, with a token mask
-- parameters:
--   base_key: score key of the base model (token_scores.score_key, its entropy)
--   pair_key: the pair run with this base (pair_scores.pair_key, its KL)
--   ratio = 0.2: share of response tokens in each top-k
--   split = pool: which split to draw from
-- output: example_id, token_ids, is_response, loss_mask, n_response_tokens, bucket

with scored as (
    select t.example_id, t.token_ids, t.is_response, t.entropy, p.kl
    from token_scores t
    join pair_scores p on p.example_id = t.example_id and p.base_key = t.score_key
    join examples e on e.example_id = t.example_id
    where t.score_key = $base_key and t.variant = 'chat' and p.pair_key = $pair_key and e.split = $split
),

tokens as (
    select
        example_id,
        unnest(generate_series(1, len(token_ids))) as pos,
        unnest(is_response) as response,
        unnest(entropy) as entropy,
        unnest(kl) as kl
    from scored
),

ranked as (
    select
        *,
        count(*) filter (where response) over (partition by example_id) as n_response,
        max(case when response then pos end) over (partition by example_id) as end_of_turn,
        row_number() over (partition by example_id, response order by entropy desc nulls last, pos) as entropy_rank,
        row_number() over (partition by example_id, response order by kl desc nulls last, pos) as kl_rank
    from tokens
),

masks as (
    select
        example_id,
        list(
            case
                when not response then 0
                when pos = end_of_turn then 1
                when entropy_rank <= ceil($ratio * n_response) or kl_rank <= ceil($ratio * n_response) then 0
                else 1
            end
            order by pos
        )::tinyint[] as loss_mask,
        max(n_response) as n_response_tokens
    from ranked
    group by example_id
),

final as (
    select scored.example_id, scored.token_ids, scored.is_response, masks.loss_mask, masks.n_response_tokens, 'eksft' as bucket
    from scored
    join masks using (example_id)
)

select * from final order by example_id
