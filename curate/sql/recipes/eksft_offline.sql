-- name: eksft_offline
-- description: EKSFT (arXiv 2605.29303) with its masks fixed ahead of training (our offline variant; the
--   paper masks online, `train sft --method eksft`). Per example, as the reference does per sequence
--   (MINE-USTC/EKSFT @0908ab2): k = floor(ratio x its response tokens); of its response tokens, the top k by
--   entropy under the base model and the top k by KL(calibrated || base) are masked out of the loss, their
--   union (the paper's script; combine = intersection: the code's default). Ties go to the earlier token.
--   Response tokens are the reference's span: its chatml template labels the assistant's whole slot,
--   `{content}<|im_end|>\n`, so the newline after the end-of-turn token is trained, maskable and counted in
--   k (span = slot: every token of the reply's turn from its content on; span = content_eot: the content and
--   the end-of-turn token, as token_scores marks them). The end-of-turn token is a candidate like any
--   response token, as in the reference (keep_end_of_turn = true never masks it). Signals of token t come
--   from the logits that predicted it (the reference is one position off). The entropy-bonus and KL loss
--   terms exist online only, where the trainer's span is content_eot.
-- grain: one row per example, with a token mask
-- parameters:
--   base_key (score_run): the base model's scoring run (token_scores, its entropy)
--   pair_key (pair_run): the pair run with this base (pair_scores, its KL)
--   ratio (float) = 0.2: k = floor(ratio x response tokens) per top-k
--   combine (text) = union: union or intersection of the two top-k
--   keep_end_of_turn (bool) = false: never mask the end-of-turn token
--   span (text) = slot: slot (the reference's labels, the newline after the end-of-turn token included) or content_eot
--   split (text) = pool: which split to draw from
-- audits: duplicate_example_id, unknown_example_id, mask_length_differs, mask_with_replaced_answer
-- needs: scores, entropy, kl
-- output: example_id, token_ids, is_response, loss_mask, n_response_tokens, bucket

with joined as (
    select t.example_id, t.token_ids, t.is_response as content_eot, t.message_index,
           coalesce(t.is_end_of_turn, list_transform(t.is_response, lambda r: false)) as is_end_of_turn, t.entropy, p.kl
    from token_scores t
    join pair_scores p on p.example_id = t.example_id and p.base_key = t.score_key
    join examples e on e.example_id = t.example_id
    where t.score_key = $base_key and t.variant = 'chat' and p.pair_key = $pair_key and e.split = $split
),

-- the span: slot adds the tokens after each end-of-turn token inside its own turn (chatml: the newline)
scored as (
    select
        * exclude (content_eot, turn_ends),
        case
            when $span = 'content_eot' then content_eot
            when $span = 'slot' then list_transform(generate_series(1, len(token_ids)), lambda i:
                coalesce(content_eot[i], false)
                or coalesce(len(list_filter(turn_ends, lambda p: p < i and message_index[p] = message_index[i])) > 0, false))
            else error('span must be slot or content_eot, got ' || $span)
        end as is_response
    from (select *, list_filter(generate_series(1, len(token_ids)), lambda p: is_end_of_turn[p]) as turn_ends from joined)
),

-- list functions per row instead of one row per token: the same ranks, far less work
positions as (
    select
        *,
        generate_series(1, len(token_ids)) as pos,
        floor($ratio * len(list_filter(is_response, lambda r: r)))::integer as k,
        list_transform(generate_series(1, len(token_ids)), lambda i:
            coalesce(is_response[i] and not ($keep_end_of_turn and is_end_of_turn[i]), false)) as candidate
    from scored
),

ranked as (
    select
        *,
        -- the top-k candidates by each signal, ties to the earlier token: sort (-signal, position)
        list_filter(list_grade_up(list_transform(pos, lambda i: case when candidate[i] then {'v': -entropy[i], 'p': i} end),
                                  'ASC', 'NULLS LAST')[1:k], lambda i: candidate[i]) as top_entropy,
        list_filter(list_grade_up(list_transform(pos, lambda i: case when candidate[i] then {'v': -kl[i], 'p': i} end),
                                  'ASC', 'NULLS LAST')[1:k], lambda i: candidate[i]) as top_kl
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
                when $combine = 'union' and (list_contains(top_entropy, i) or list_contains(top_kl, i)) then 0
                when $combine = 'intersection' and list_contains(top_entropy, i) and list_contains(top_kl, i) then 0
                when $combine not in ('union', 'intersection') then error('combine must be union or intersection, got ' || $combine)
                else 1
            end
        )::tinyint[] as loss_mask,
        len(list_filter(is_response, lambda r: r)) as n_response_tokens,
        'eksft' as bucket
    from ranked
)

select * from final order by example_id
