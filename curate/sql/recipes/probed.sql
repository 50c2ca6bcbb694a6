-- name: probed
-- description: every example the answer-entropy probe read validly (not "0", not sure), easy, middle and hard
--   alike: what the complexity-aware teacher answers. `complexity_split` stage 1 trains the teacher's parsed
--   answers of the easy and middle examples ("[[distill_answer]]", Qwen_train_test_sft.py:184), stage 2 its
--   traces of the hard ones, so select this, then `curate generate --from probed`. With answer_source = gold
--   the teacher is needed for the hard examples only: `probe_hard`.
-- grain: one row per validly probed example
-- parameters:
--   probe_key (probe_run): the probe run (probe_scores.probe_key)
--   split (text) = pool: which split to draw from
-- needs: probe
-- output: example_id, entropy_norm, bucket

with probed as (
    select p.example_id, p.entropy_norm
    from probe_scores p
    join examples e using (example_id)
    where p.probe_key = $probe_key and p.is_valid and e.split = $split
),

final as (
    select example_id, entropy_norm, 'probed' as bucket from probed
)

select * from final order by example_id
