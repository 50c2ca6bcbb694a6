-- name: instructdiff
-- description: InstructDiff (arXiv 2601.23006) as its code selects (zhuchichi56/Instruct-diff @28adfe3).
--   With a base and a calibrated model scored on the same examples: diff_nll = NLL_base - NLL_calibrated
--   and diff_entropy = H_base - H_calibrated, means over the response tokens without the end-of-turn token
--   (the reference scores plain text with no EOS; include_end_of_turn = true keeps it). Drop int(trim x N)
--   examples at each end by diff_nll (none when that would leave nothing), then add examples by ascending
--   diff_entropy until the budget: int(share x the response tokens of all N scored examples, counted
--   before trimming), the example that crosses it included, at least one (budget = tokens, the code);
--   budget = samples takes max(1, int(share x the trimmed count)) examples instead (the paper's text).
--   Ties go to the smaller example_id. Score both models with `curate score --prompt-format alpaca` to
--   use the reference's prompt too.
-- grain: one row per selected example
-- parameters:
--   base_key (score_run): the base model's scoring run
--   calibrated_key (score_run): the calibrated model's scoring run
--   trim (float) = 0.1: share dropped at each end by diff_nll (gamma)
--   share (float) = 0.1: the budget's share (beta)
--   budget (text) = tokens: tokens (the code) or samples (the paper's text)
--   include_end_of_turn (bool) = false: count the end-of-turn token in the means and the budget
--   split (text) = pool: which split to draw from
-- needs: scores, entropy, calibrated
-- output: example_id, diff_nll, diff_entropy, n_response_tokens, bucket

with base as (
    select example_id,
           case when $include_end_of_turn then mean_nll else mean_nll_content end as nll,
           case when $include_end_of_turn then mean_entropy else mean_entropy_content end as entropy,
           case when $include_end_of_turn then n_response_tokens else n_content_tokens end as n_tokens
    from sample_scores where score_key = $base_key
),

calibrated as (
    select example_id,
           case when $include_end_of_turn then mean_nll else mean_nll_content end as nll,
           case when $include_end_of_turn then mean_entropy else mean_entropy_content end as entropy
    from sample_scores where score_key = $calibrated_key
),

paired as (
    select
        base.example_id,
        base.nll - calibrated.nll as diff_nll,
        base.entropy - calibrated.entropy as diff_entropy,
        base.n_tokens
    from base
    join calibrated using (example_id)
    join examples e using (example_id)
    where e.split = $split and base.nll is not null and calibrated.nll is not null
),

totals as (
    select count(*) as n, floor($trim * count(*))::integer as cut, floor($share * sum(n_tokens))::bigint as token_budget
    from paired
),

trimmed as (
    select paired.*
    from (select *, row_number() over (order by diff_nll, example_id) as nll_rank from paired) paired, totals
    where totals.cut * 2 >= totals.n or (nll_rank > totals.cut and nll_rank <= totals.n - totals.cut)
),

ranked as (
    select
        *,
        row_number() over (order by diff_entropy, example_id) as position,
        sum(n_tokens) over (order by diff_entropy, example_id rows unbounded preceding) as running_tokens,
        count(*) over () as n_trimmed
    from trimmed
),

final as (
    select example_id, diff_nll, diff_entropy, n_tokens as n_response_tokens, 'instructdiff' as bucket
    from ranked, totals
    where case $budget
        when 'tokens' then position = 1 or running_tokens - n_tokens < totals.token_budget
        when 'samples' then position <= greatest(1, floor($share * n_trimmed))
        else error('budget must be tokens or samples, got ' || $budget)
    end
)

select * from final order by example_id
