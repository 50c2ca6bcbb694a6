-- name: complexity_split
-- description: complexity-aware fine-tuning (arXiv 2506.21220; LabARSS/complexity-aware-fine-tuning
--   @802051c), both stages, as its training scripts build their rows. The answer-entropy probe's entropy,
--   normalised as H / max(H) over the valid probed examples, is cut at two quantiles (linear interpolation):
--   easy < low_quantile <= middle < high_quantile <= hard (0.25 / 0.75, as the released splits). The bounded
--   middle bucket is the intended rule: the reference notebook's middle file has no upper bound (a bug, not
--   copied). Stage 1 (easy and middle) trains "[[distill_answer]]", the teacher's parsed answer, not the gold
--   one, and keeps only rows that have one (Qwen_train_test_sft.py:184, :204): the teacher answers every
--   example, not only the hard ones (answer_source = gold: the reference answer, no teacher needed there);
--   its prompt is the question with the answer-only instruction appended. Stage 2 (hard) trains the teacher's
--   trace, keeping every hard row that has one whether or not an answer parses (Qwen_train_test_cot.py:181;
--   require_parsed = true: only traces with a parsed answer), under the training script's own prompt
--   (cot:149-159): its system prompt without the subject, then "Question: ...", the options numbered from 1
--   when the example has a choices field, and "Please analyze step by step and provide the answer." (the
--   script's f-string also indents every line by eight spaces: not copied). stage2_prompt = teacher: the
--   exact prompt the teacher was asked with. Stage 2 starts from the merged stage-1 checkpoint (`train sft
--   --stage 1`, then `train sft --stage 2 --model STAGE1/adapter`). Our deviation: a trace cut off by the
--   teacher's max_tokens is left out (the reference keeps any response). Both stages read the trace
--   best-of-n chose (one sample: the reference's). Invalid probe answers (and "0", not sure) are dropped. The
--   paper's baselines are plans of the same split: plan = answer_only (every example answer-only, one stage),
--   distill (every example with its trace, one stage), alternative (traces for easy and middle in stage 1,
--   answer-only for hard in stage 2).
-- grain: one row per selected example
-- parameters:
--   probe_key (probe_run): the probe run (probe_scores)
--   gen_key (generate_run): the generation run whose best_traces give the teacher's answers and traces
--   rule (text) = shortest: the best-of-n rule (best_traces.rule)
--   low_quantile (float) = 0.25: easy below this quantile of H / max(H)
--   high_quantile (float) = 0.75: hard at or above this one
--   answer_instruction (text) = Answer with only one number in [[number]].: appended to the question in stage 1
--   answer_source (text) = distill: distill (the teacher's parsed answer, the reference) or gold (the reference answer)
--   require_parsed (bool) = false: keep only traces whose answer parses
--   require_correct (bool) = false: keep correct traces only
--   stage2_prompt (text) = script: script (the training script's prompt, the reference) or teacher (the teacher's prompt)
--   stage2_system (text) = The following are multiple choice questions. Explain your thinking process step-by-step. At the end, write the correct answer number using [[number]] format.: the script's system prompt
--   stage2_instruction (text) = Please analyze step by step and provide the answer.: the script's instruction after the question
--   plan (text) = reference: reference, answer_only, distill or alternative
--   split (text) = pool: which split to draw from
-- needs: probe, traces
-- output: example_id, stage, bucket, entropy_norm, prompt, assistant_text

with probed as (
    select p.example_id, p.entropy, e.messages, e.reference_answer, e.meta
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
        case when $plan in ('answer_only', 'distill') or bucket <> 'hard' then 1 else 2 end as stage,
        list_filter(messages, lambda m: m.role = 'user')[-1].content as question,
        json_extract_string(meta, '$.fields.choices[*]') as choices
    from bucketed
),

-- the trace best-of-n chose per example: its text, the answer parsed from it and the prompt the teacher saw
teacher as (
    select b.example_id, b.text, b.truncated, b.is_correct, t.extracted_answer, t.prompt as teacher_prompt
    from best_traces b
    join traces t using (trace_id)
    where b.gen_key = $gen_key and b.rule = $rule
),

-- answer-only rows: the question with the answer-only instruction, "[[answer]]" as the reply
answer_only as (
    select example_id, stage, bucket, entropy_norm,
           list_filter(messages, lambda m: m.role = 'system')
               || [{'role': 'user', 'content': question || chr(10) || chr(10) || $answer_instruction}] as prompt,
           '[[' || answer || ']]' as assistant_text
    from (
        select
            planned.*,
            case $answer_source
                when 'distill' then teacher.extracted_answer
                when 'gold' then planned.reference_answer
                else error('answer_source must be distill or gold, got ' || $answer_source)
            end as answer
        from planned
        left join teacher using (example_id)
        where planned.reply = 'answer'
    )
    where answer is not null
),

-- trace rows: the teacher's trace under the training script's prompt (or the teacher's own)
traced as (
    select
        planned.example_id, planned.stage, planned.bucket, planned.entropy_norm,
        case $stage2_prompt
            when 'script' then [
                {'role': 'system', 'content': $stage2_system},
                {'role': 'user', 'content': 'Question: ' || trim(planned.question, ' ' || chr(9) || chr(10) || chr(13))
                    || case when len(coalesce(planned.choices, [])) > 0 then chr(10) || 'Options:' || chr(10)
                        || array_to_string(list_transform(planned.choices, lambda c, i: i || '. ' || trim(c, ' ' || chr(9) || chr(10) || chr(13))), chr(10))
                       else '' end
                    || chr(10) || $stage2_instruction}]
            when 'teacher' then teacher.teacher_prompt
            else error('stage2_prompt must be script or teacher, got ' || $stage2_prompt)
        end as prompt,
        teacher.text as assistant_text
    from planned
    join teacher using (example_id)
    where planned.reply = 'trace' and coalesce(teacher.text, '') <> '' and not teacher.truncated
      and (not $require_parsed or teacher.extracted_answer is not null)
      and (not $require_correct or teacher.is_correct)
),

final as (
    select * from answer_only
    union all
    select * from traced
)

select * from final order by example_id
