-- name: full
-- description: every example of the split: the baseline every selection is compared with.
-- grain: one row per example
-- parameters:
--   split (text) = pool: which split to take
-- output: example_id, bucket

with pool as (
    select example_id from examples where split = $split
),

final as (
    select example_id, 'full' as bucket from pool
)

select * from final order by example_id
