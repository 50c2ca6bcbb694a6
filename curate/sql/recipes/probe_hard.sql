-- name: probe_hard
-- description: the examples the answer-entropy probe finds hardest (normalised entropy at or above the
--   high quantile): the hard split of complexity-aware fine-tuning, before any trace exists. Select it,
--   then `curate generate --from probe_hard` makes the teacher traces that `complexity_split` trains on.
-- grain: one row per hard example
-- parameters:
--   probe_key (probe_run): the probe run (probe_scores.probe_key)
--   high_quantile (float) = 0.75: hard at or above this quantile (use the same value in complexity_split)
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
    select example_id, entropy_norm, 'hard' as bucket
    from probed
    where entropy_norm >= (select quantile_cont(entropy_norm, $high_quantile) from probed)
)

select * from final order by example_id
