import pytest

from curate.kernel.answers import extract_answer, normalize_answer


@pytest.mark.parametrize(
    ("text", "style", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "hash", "18"),
        ("Total is 1,000 dollars\n#### 1,000", "hash", "1000"),
        ("#### 5\nlater text\n#### 7", "hash", "7"),
        ("so he pays 40 * 5 = 200\n#### 200 = 200 dollars", "hash", "200"),
        ("#### x = 4", "hash", "x = 4"),
        ("so \\boxed{\\frac{1}{2}} is it", "boxed", "\\frac{1}{2}"),
        ("The answer is $18.00.", "answer-is", "18"),
        ("Answer: 42 apples", "answer-is", "42"),
        ("first 3 then 4.50 then -2", "last-number", "-2"),
        ("no number here", "last-number", None),
        ("We get 12 apples, so the answer is 12.", "auto", "12"),
        ("Therefore \\boxed{7}. The answer is 8", "auto", "7"),
        ("nothing to see", "auto", None),
    ],
)
def test_extract_answer(text: str, style: str, expected: str | None) -> None:
    assert extract_answer(text, style) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("18", "18"), ("$1,234.50", "1234.5"), ("3.000", "3"), ("-0.0", "0"), ("15 km", "15"), (" B ", "B"), ("42%", "42")],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_unknown_style_is_named() -> None:
    with pytest.raises(ValueError, match="unknown answer style 'latex'"):
        extract_answer("x", "latex")


# Real-looking completions of a small model on GSM8K and multiple-choice prompts.
GRADED = [
    ("Janet has 16 eggs. She eats 3 and bakes 4, so 16 - 3 - 4 = 9 eggs. 9 * $2 = $18.\n#### 18", "numeric", "18", "18", True),
    ("The total is 5 + 7 = 12.\n#### 12", "numeric", "18", "12", False),
    ("First we find the cost per item: 3 * 4 = 12. Then we multiply by", "numeric", "36", "12", False),  # cut off
    ("I am not sure how to solve this problem.", "numeric", "7", None, False),
    ("He earns $1,250.00 in total.\n#### $1,250", "numeric", "1250", "1250", True),
    ("So the answer is 0.50 dollars.", "numeric", "0.5", "0.5", True),
    ("Mars is red because of iron oxide.\nAnswer: B", "choice", "B", "B", True),
    ("Water boils at 100 C, so the answer is (C).", "choice", "C", "C", True),
    ("Let me think. Plants absorb oxygen.\nAnswer: B", "choice", "A", "B", False),
    ("Spiders are arachnids with", "choice", "D", None, False),
    ("The 4 legs... no wait. Final answer: \\boxed{D}", "choice", "D", "D", True),
    ("#### 4", "numeric", None, "4", None),  # no reference: graded as unknown
]


@pytest.mark.parametrize(("text", "kind", "reference", "answer", "correct"), GRADED)
def test_grade_completions(text: str, kind: str, reference: str | None, answer: str | None, correct: bool | None) -> None:
    from curate.kernel.answers import grade

    assert grade(text, reference, kind=kind) == (answer, correct)
    if reference is not None:  # the kind is read from the reference when not given: a letter is multiple choice
        assert grade(text, reference) == (answer, correct)
