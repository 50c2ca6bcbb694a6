-- name: examples_by_split
-- description: what the workspace holds: examples per source and split, with how many carry a
--   reference answer and how long the conversations are (characters of the last assistant turn).
-- grain: one row per (source, split)
-- parameters: none
-- output: source, split, examples, with_reference_answer, mean_answer_chars, max_answer_chars

with examples_in as (
    select source, split, reference_answer, messages[len(messages)].content as answer_text
    from examples
),

final as (
    select
        source,
        split,
        count(*) as examples,
        count(reference_answer) as with_reference_answer,
        round(avg(length(answer_text)), 1) as mean_answer_chars,
        max(length(answer_text)) as max_answer_chars
    from examples_in
    group by source, split
)

select * from final order by source, split
