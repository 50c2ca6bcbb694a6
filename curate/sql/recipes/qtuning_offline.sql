-- name: qtuning_offline
-- description: Q-Tuning (arXiv 2509.23873) over the whole pool as one batch, as the reference trainer does it
--   per micro-batch (Q-tuning/Q-tuning @dd6eba5). Per example: PPL over its response tokens and the mean
--   entropy over every predicted position, prompt included (entropy_over = response: the response only).
--   alpha = beta moved together by bisection on [0, 0.49] (at most 10 iterations, tolerance 0.01) with
--   linear-interpolation quantiles, keeping the last iterate (search = best-under: the iterate keeping the
--   most without going over r_sample). Q2 = PPL > q(1 - alpha) and H <= q(alpha) (misconception: kept,
--   tokens pruned); Q4 = PPL <= q(alpha) and H > q(1 - alpha) (calibration: kept whole). Filled up to
--   max(1, round(N r_sample)) by |ppl_n - H_n| (min-max normalised), a filled example being Q2-like when
--   ppl_n >= H_n. Token budget: keep round(T r_sample r_token) of the pool's T predicted positions (n - 1
--   per example, prompt included); the positions of dropped examples count as removed; the rest is removed
--   from the response tokens of Q2 and Q2-like examples, highest s_t = (1 - smoothing) ppl_t + smoothing
--   (ppl_{t-1} + ppl_{t+1}) first, a prompt position having ppl 1 and one before the start or past the end
--   0; ties to the earlier example, then the earlier token. At r_token = 1.0 no token is pruned, whatever
--   the budget says (the reference prunes only when token_ratio != 1.0, trainer.py:683). Response tokens
--   are the reference's labels: its chatml template labels the assistant's whole slot, `{content}<|im_end|>\n`,
--   so the end-of-turn token and the newline after it are response tokens like the others, in the PPL and
--   prunable (span = slot: every token of the reply's turn from its content on; span = content_eot: the
--   content and the end-of-turn token, as token_scores marks them). Under span = slot every kept row carries
--   its mask (so a trainer trains the newline of Q4 rows too). Rounding halves to even, as the reference's
--   Python round. A Q2 example that loses every response token trains nothing: select drops it, counted.
-- grain: one row per kept example; Q2 and Q2-like rows carry a token mask (every kept row under span = slot)
-- parameters:
--   score_key (score_run): the scoring run (token_scores)
--   r_sample (float) = 0.25: share of the examples kept (the paper's headline run)
--   r_token (float) = 0.5: with r_sample, the share of the pool's positions kept
--   smoothing (float) = 0.5: lambda, the neighbours' weight in the token score
--   entropy_over (text) = all: all (the reference) or response
--   search (text) = last: last (the reference) or best-under
--   span (text) = slot: slot (the reference's labels, the newline after the end-of-turn token included) or content_eot
--   split (text) = pool: which split to draw from
-- audits: duplicate_example_id, unknown_example_id, mask_length_differs, mask_with_replaced_answer
-- needs: scores, entropy
-- output: example_id, bucket, alpha, ppl, mean_entropy, token_ids, is_response, loss_mask, n_response_tokens

with recursive joined as (
    select t.example_id, t.token_ids, t.is_response as content_eot, t.message_index,
           coalesce(t.is_end_of_turn, list_transform(t.is_response, lambda r: false)) as is_end_of_turn, t.logprob, t.entropy, t.n_tokens
    from token_scores t
    join examples e on e.example_id = t.example_id
    where t.score_key = $score_key and t.variant = 'chat' and e.split = $split
),

-- the span: slot adds the tokens after each end-of-turn token inside its own turn (chatml: the newline)
spanned as (
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

-- per example, over its response tokens as sample_scores averages them: PPL, their count, and the entropy
scored as (
    select
        example_id, token_ids, is_response, logprob, n_tokens,
        exp(-list_avg(list_where(logprob, is_response))) as ppl,
        len(list_filter(is_response, lambda r: r)) as n_response_tokens,
        case
            when $entropy_over = 'all' then list_avg(entropy)
            when $entropy_over = 'response' then list_avg(list_where(entropy, is_response))
            else error('entropy_over must be all or response, got ' || $entropy_over)
        end as mean_entropy
    from spanned
),

pool as (
    select list_sort(list(ppl)) as ppls, list_sort(list(mean_entropy)) as entropies, count(*) as n from scored
),

-- the bisection: one row per iteration; quantile q of a sorted list l of n values is linear interpolation
-- at h = (n - 1) q between l[floor(h) + 1] and l[floor(h) + 2] (lists count from 1)
search(iteration, low, high, alpha, p_low, p_high, h_low, h_high, share, stop) as (
    select 0, 0.0::double, 0.49::double, null::double, null::double, null::double, null::double, null::double,
           null::double, false
    union all
    select
        step.iteration + 1,
        case when step.share < $r_sample then step.alpha else step.low end,
        case when step.share < $r_sample then step.high else step.alpha end,
        step.alpha, step.p_low, step.p_high, step.h_low, step.h_high, step.share,
        abs(step.share - $r_sample) < 0.01
    from (
        select
            cut.*,
            (select count(*) filter (where (ppl > cut.p_high and mean_entropy <= cut.h_low)
                                        or (ppl <= cut.p_low and mean_entropy > cut.h_high)) from scored)::double
                / (select n from pool) as share
        from (
            select
                s.iteration, s.low, s.high, (s.low + s.high) / 2 as alpha,
                list_transform([(p.n - 1) * (s.low + s.high) / 2, (p.n - 1) * (1 - (s.low + s.high) / 2)], lambda h:
                    p.ppls[floor(h)::integer + 1]
                    + (h - floor(h)) * (p.ppls[least(floor(h)::integer + 2, p.n)] - p.ppls[floor(h)::integer + 1])) as ppl_cuts,
                list_transform([(p.n - 1) * (s.low + s.high) / 2, (p.n - 1) * (1 - (s.low + s.high) / 2)], lambda h:
                    p.entropies[floor(h)::integer + 1]
                    + (h - floor(h)) * (p.entropies[least(floor(h)::integer + 2, p.n)] - p.entropies[floor(h)::integer + 1])) as entropy_cuts
            from search s, pool p
            where s.iteration < 10 and not s.stop
        ) raw,
        lateral (select raw.iteration, raw.low, raw.high, raw.alpha, raw.ppl_cuts[1] as p_low, raw.ppl_cuts[2] as p_high,
                        raw.entropy_cuts[1] as h_low, raw.entropy_cuts[2] as h_high) cut
    ) step
),

chosen as (
    select alpha, p_low, p_high, h_low, h_high
    from search
    where iteration > 0
    order by
        case
            when $search = 'last' then -iteration
            when $search = 'best-under' then case when share <= $r_sample then -share else 2 + share end
            else error('search must be last or best-under, got ' || $search)
        end,
        iteration
    limit 1
),

quadrants as (
    select
        scored.example_id, scored.ppl, scored.mean_entropy, scored.n_tokens, scored.n_response_tokens, chosen.alpha,
        case
            when ppl > p_high and mean_entropy <= h_low then 'q2'
            when ppl <= p_low and mean_entropy > h_high then 'q4'
        end as quadrant,
        (ppl - min(ppl) over ()) / nullif(max(ppl) over () - min(ppl) over (), 0) as ppl_n,
        (mean_entropy - min(mean_entropy) over ()) / nullif(max(mean_entropy) over () - min(mean_entropy) over (), 0) as entropy_n
    from scored, chosen
),

-- fill-up to max(1, round(N r_sample)) by |ppl_n - H_n|, farthest from the diagonal first
filled as (
    select
        *,
        case
            when quadrant is not null then quadrant
            when row_number() over (partition by quadrant is null
                                    order by abs(coalesce(ppl_n, 0) - coalesce(entropy_n, 0)) desc, example_id)
                 <= greatest(1, round_even((select n from pool) * $r_sample, 0))
                    - (select count(quadrant) from quadrants)
            then case when coalesce(ppl_n, 0) >= coalesce(entropy_n, 0) then 'q2_fill' else 'q4_fill' end
        end as bucket
    from quadrants
),

budget as (
    select case when $r_token = 1.0 then 0 else greatest(0,
        (sum(n_tokens - 1) - round_even(sum(n_tokens - 1) * $r_sample * $r_token, 0))
        - coalesce(sum(n_tokens - 1) filter (where bucket is null), 0)
    ) end as remaining
    from filled
),

-- one row per response token of the Q2 and Q2-like examples, with its neighbours' ppl by position
candidates as (
    select example_id, position, score
    from (
        select
            example_id,
            unnest(generate_series(1, len(token_ids))) as position,
            unnest(list_transform(generate_series(1, len(token_ids)), lambda i:
                case when i = 1 then null else
                    (1 - $smoothing) * exp(-logprob[i])
                    + $smoothing * (
                        (case when i <= 2 then 0 when is_response[i - 1] then exp(-logprob[i - 1]) else 1 end)
                        + (case when i >= len(token_ids) then 0 when is_response[i + 1] then exp(-logprob[i + 1]) else 1 end))
                end)) as score,
            unnest(is_response) as response
        from filled join scored using (example_id)
        where bucket in ('q2', 'q2_fill')
    )
    where response and position > 1
),

dropped as (
    select example_id, list(position) as positions
    from (
        select *, row_number() over (order by score desc, example_id, position) as rank
        from candidates
    )
    where rank <= (select remaining from budget)
    group by example_id
),

final as (
    select
        filled.example_id, filled.bucket, filled.alpha, filled.ppl, filled.mean_entropy,
        case when filled.bucket in ('q2', 'q2_fill') or $span = 'slot' then filled.token_ids end as token_ids,
        case when filled.bucket in ('q2', 'q2_fill') or $span = 'slot' then filled.is_response end as is_response,
        case when filled.bucket in ('q2', 'q2_fill') or $span = 'slot' then
            list_transform(generate_series(1, len(filled.is_response)), lambda i:
                case when i > 1 and filled.is_response[i] and not list_contains(coalesce(dropped.positions, []), i) then 1 else 0 end
            )::tinyint[]
        end as loss_mask,
        filled.n_response_tokens
    from (select filled.*, scored.token_ids, scored.is_response from filled join scored using (example_id)) filled
    left join dropped using (example_id)
    where filled.bucket is not null
)

select * from final order by example_id
