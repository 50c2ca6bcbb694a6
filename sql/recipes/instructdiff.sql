-- name: instructdiff
-- description: InstructDiff (arXiv 2601.23006). With a base and a calibrated model scored on the same
--   examples: delta_nll = NLL_calibrated - NLL_base, delta_entropy = H_base - H_calibrated (means over
--   response tokens). Drop the bottom and top `trim` share by delta_nll, then keep the examples with the
--   lowest delta_entropy: `fraction` of the scored pool (the paper), or, when budget_tokens > 0, as many
--   as fit in that many response tokens (the authors' code).
-- grain: one row per selected example
-- parameters:
--   base_key (score_run): score key of the base model (sample_scores.score_key)
--   calibrated_key (score_run): score key of the calibrated model
--   trim (float) = 0.1: share dropped at each end by delta_nll (gamma)
--   fraction (float) = 0.1: share of the scored pool selected (beta), when budget_tokens is 0
--   budget_tokens (int) = 0: response-token budget instead of a sample share (0: use fraction)
--   split (text) = pool: which split to draw from
-- output: example_id, delta_nll, delta_entropy, n_response_tokens, bucket

with base as (
    select example_id, mean_nll, mean_entropy, n_response_tokens from sample_scores where score_key = $base_key
),

calibrated as (
    select example_id, mean_nll, mean_entropy from sample_scores where score_key = $calibrated_key
),

pool as (
    select example_id from examples where split = $split
),

paired as (
    select
        base.example_id,
        calibrated.mean_nll - base.mean_nll as delta_nll,
        base.mean_entropy - calibrated.mean_entropy as delta_entropy,
        base.n_response_tokens
    from base
    join calibrated using (example_id)
    join pool using (example_id)
),

trimmed as (
    select *
    from (
        select *, row_number() over (order by delta_nll, example_id) as nll_rank, count(*) over () as n_paired
        from paired
    )
    where nll_rank > floor($trim * n_paired) and nll_rank <= n_paired - floor($trim * n_paired)
),

ranked as (
    select
        *,
        row_number() over (order by delta_entropy, example_id) as position,
        sum(n_response_tokens) over (order by delta_entropy, example_id rows unbounded preceding) as running_tokens
    from trimmed
),

final as (
    select example_id, delta_nll, delta_entropy, n_response_tokens, 'instructdiff' as bucket
    from ranked
    where case
        when $budget_tokens > 0 then running_tokens <= $budget_tokens
        else position <= ceil($fraction * n_paired)
    end
)

select * from final order by example_id
