-- name: complexity_split
-- description: complexity-aware fine-tuning (arXiv 2506.21220). The answer-entropy probe's normalised
--   entropy splits the valid probed examples at two quantiles: easy < low_quantile <= middle <
--   high_quantile <= hard (the released MMLU-Pro splits use 0.25 / 0.75). Easy and middle examples train
--   answer-only (the reference answer as the whole reply); hard ones train on the teacher trace that
--   best-of-n chose (correct, or unchecked when there is no reference). Hard examples without such a
--   trace are left out (the paper distils only where a trace exists). Invalid probe answers are dropped.
-- grain: one row per selected example
-- parameters:
--   probe_key (probe_run): the probe run (probe_scores.probe_key)
--   gen_key (generate_run): the generation run whose best_traces give the hard examples' replies
--   rule (text) = shortest: the best-of-n rule (best_traces.rule)
--   low_quantile (float) = 0.25: easy below this quantile of normalised entropy
--   high_quantile (float) = 0.75: hard at or above this one
--   split (text) = pool: which split to draw from
-- output: example_id, bucket, entropy_norm, assistant_text

with probed as (
    select p.example_id, p.entropy_norm, p.reference_answer
    from probe_scores p
    join examples e using (example_id)
    where p.probe_key = $probe_key and p.is_valid and e.split = $split
),

cuts as (
    select
        quantile_cont(entropy_norm, $low_quantile) as low,
        quantile_cont(entropy_norm, $high_quantile) as high
    from probed
),

bucketed as (
    select
        probed.*,
        case
            when probed.entropy_norm < cuts.low then 'easy'
            when probed.entropy_norm < cuts.high then 'middle'
            else 'hard'
        end as bucket
    from probed, cuts
),

chosen_traces as (
    select example_id, text
    from best_traces
    where gen_key = $gen_key and rule = $rule and is_correct is not false and not truncated
),

final as (
    select
        bucketed.example_id,
        bucketed.bucket,
        bucketed.entropy_norm,
        case when bucketed.bucket = 'hard' then chosen_traces.text else bucketed.reference_answer end as assistant_text
    from bucketed
    left join chosen_traces using (example_id)
    where bucketed.bucket <> 'hard' or chosen_traces.text is not null
)

select * from final order by example_id
