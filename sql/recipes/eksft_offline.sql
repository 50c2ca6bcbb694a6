-- name: eksft_offline
-- description: EKSFT offline (our variant of arXiv 2605.29303): per example, of its response tokens, the
--   top `ratio` by entropy under the base model and the top `ratio` by KL(calibrated || base) are masked
--   out of the loss (union, so between k and 2k tokens with k = ceil(ratio x response tokens)). The paper
--   masks online per micro-batch under the model being trained (`train sft --method eksft`); here the
--   mask is fixed ahead of training from a base and a calibrated model. The end-of-turn token is always
--   kept: it teaches the model to stop. Signals of token t come from the logits that predicted it.
-- grain: one row per example, with a token mask
-- parameters:
--   base_key (score_run): score key of the base model (token_scores.score_key, its entropy)
--   pair_key (pair_run): the pair run with this base (pair_scores.pair_key, its KL)
--   ratio (float) = 0.2: share of response tokens in each top-k
--   split (text) = pool: which split to draw from
-- output: example_id, token_ids, is_response, loss_mask, n_response_tokens, bucket

with scored as (
    select t.example_id, t.token_ids, t.is_response, t.entropy, p.kl
    from token_scores t
    join pair_scores p on p.example_id = t.example_id and p.base_key = t.score_key
    join examples e on e.example_id = t.example_id
    where t.score_key = $base_key and t.variant = 'chat' and p.pair_key = $pair_key and e.split = $split
),

-- list functions per row instead of one row per token: the same ranks, far less work
positions as (
    select
        *,
        generate_series(1, len(token_ids)) as pos,
        len(list_filter(is_response, lambda r: r)) as n_response,
        len(is_response) - list_position(list_reverse(is_response), true) + 1 as end_of_turn
    from scored
),

ranked as (
    select
        *,
        -- the top-k response positions by each signal, ties to the earlier token: sort (-signal, position)
        list_grade_up(list_transform(pos, lambda i: case when is_response[i] then {'v': -entropy[i], 'p': i} end), 'ASC', 'NULLS LAST')[1:ceil($ratio * n_response)::integer] as top_entropy,
        list_grade_up(list_transform(pos, lambda i: case when is_response[i] then {'v': -kl[i], 'p': i} end), 'ASC', 'NULLS LAST')[1:ceil($ratio * n_response)::integer] as top_kl
    from positions
),

final as (
    select
        example_id,
        token_ids,
        is_response,
        list_transform(pos, lambda i:
            case
                when not is_response[i] then 0
                when i = end_of_turn then 1
                when list_contains(top_entropy, i) or list_contains(top_kl, i) then 0
                else 1
            end
        )::tinyint[] as loss_mask,
        n_response as n_response_tokens,
        'eksft' as bucket
    from ranked
)

select * from final order by example_id
