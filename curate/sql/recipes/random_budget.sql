-- name: random_budget
-- description: a random subset of the scored examples (reproducible by seed) whose response tokens add
--   up to at most the budget: the "same budget" baseline for any other selection.
-- grain: one row per selected example
-- parameters:
--   score_key (score_run): the scoring run whose sample_scores give n_response_tokens
--   budget_tokens (int): response tokens to spend (e.g. what another selection kept)
--   seed (int) = 0: changes the random order
--   split (text) = pool: which split to draw from
-- needs: scores
-- output: example_id, n_response_tokens, bucket

with scored as (
    select s.example_id, s.n_response_tokens
    from sample_scores s
    join examples e using (example_id)
    where s.score_key = $score_key and e.split = $split
),

ordered as (
    select
        *,
        sum(n_response_tokens) over (
            order by md5(example_id || ':' || cast($seed as varchar)) rows unbounded preceding
        ) as running_tokens
    from scored
),

final as (
    select example_id, n_response_tokens, 'random' as bucket
    from ordered
    where running_tokens <= $budget_tokens
)

select * from final order by example_id
