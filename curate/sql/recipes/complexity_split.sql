-- name: complexity_split
-- description: complexity-aware fine-tuning (arXiv 2506.21220; LabARSS/complexity-aware-fine-tuning
--   @802051c), both stages. The answer-entropy probe's entropy, normalised as H / max(H) over the valid
--   probed examples, is cut at two quantiles (linear interpolation): easy < low_quantile <= middle <
--   high_quantile <= hard (0.25 / 0.75, as the released splits). Stage 1 (easy and middle) trains the bare
--   answer, "[[answer]]", under the question with the answer-only instruction appended; stage 2 (hard)
--   trains the teacher's trace under the exact prompt the teacher saw, starting from the merged stage-1
--   checkpoint (`train sft --stage 1`, then `train sft --stage 2 --model STAGE1/adapter`). A hard example
--   keeps the trace best-of-n chose whenever its answer parses and it was not cut off, correct or not, as
--   the reference (require_correct = true: correct ones only); hard examples without one are left out.
--   Invalid probe answers (and "0", not sure) are dropped. The paper's baselines are plans of the same
--   split: plan = answer_only (every example answer-only, one stage), distill (every example with its
--   trace, one stage), alternative (traces for easy and middle in stage 1, answer-only for hard in stage 2).
-- grain: one row per selected example
-- parameters:
--   probe_key (probe_run): the probe run (probe_scores)
--   gen_key (generate_run): the generation run whose best_traces give the hard examples' replies
--   rule (text) = shortest: the best-of-n rule (best_traces.rule)
--   low_quantile (float) = 0.25: easy below this quantile of H / max(H)
--   high_quantile (float) = 0.75: hard at or above this one
--   answer_instruction (text) = Answer with only one number in [[number]].: appended to the question in stage 1
--   require_correct (bool) = false: keep correct traces only
--   plan (text) = reference: reference, answer_only, distill or alternative
--   split (text) = pool: which split to draw from
-- output: example_id, stage, bucket, entropy_norm, prompt, assistant_text

with probed as (
    select p.example_id, p.entropy, e.messages, e.reference_answer
    from probe_scores p
    join examples e using (example_id)
    where p.probe_key = $probe_key and p.is_valid and e.split = $split
),

normalised as (
    select *, entropy / nullif(max(entropy) over (), 0) as entropy_norm from probed
),

cuts as (
    select quantile_cont(entropy_norm, $low_quantile) as low, quantile_cont(entropy_norm, $high_quantile) as high
    from normalised
),

bucketed as (
    select
        normalised.*,
        case
            when normalised.entropy_norm < cuts.low then 'easy'
            when normalised.entropy_norm < cuts.high then 'middle'
            else 'hard'
        end as bucket
    from normalised, cuts
),

planned as (
    select
        *,
        case $plan
            when 'reference' then case when bucket = 'hard' then 'trace' else 'answer' end
            when 'answer_only' then 'answer'
            when 'distill' then 'trace'
            when 'alternative' then case when bucket = 'hard' then 'answer' else 'trace' end
            else error('plan must be reference, answer_only, distill or alternative, got ' || $plan)
        end as reply,
        case when $plan in ('answer_only', 'distill') or bucket <> 'hard' then 1 else 2 end as stage
    from bucketed
),

-- answer-only rows: the question with the answer-only instruction, the bare answer as the reply
answer_only as (
    select
        example_id, stage, bucket, entropy_norm,
        list_filter(messages, lambda m: m.role = 'system')
            || [{'role': 'user', 'content': list_filter(messages, lambda m: m.role = 'user')[-1].content || chr(10) || chr(10) || $answer_instruction}]
            as prompt,
        '[[' || reference_answer || ']]' as assistant_text
    from planned
    where reply = 'answer' and reference_answer is not null
),

-- trace rows: the teacher's own prompt and its trace
chosen_traces as (
    select b.example_id, t.prompt, b.text
    from best_traces b
    join traces t using (trace_id)
    where b.gen_key = $gen_key and b.rule = $rule and not b.truncated and t.extracted_answer is not null
      and (not $require_correct or b.is_correct)
),

traced as (
    select planned.example_id, planned.stage, planned.bucket, planned.entropy_norm, chosen_traces.prompt,
           chosen_traces.text as assistant_text
    from planned
    join chosen_traces using (example_id)
    where planned.reply = 'trace'
),

final as (
    select * from answer_only
    union all
    select * from traced
)

select * from final order by example_id
