import pytest

from curate.answers import extract_answer, normalize_answer


@pytest.mark.parametrize(
    ("text", "style", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "hash", "18"),
        ("Total is 1,000 dollars\n#### 1,000", "hash", "1000"),
        ("#### 5\nlater text\n#### 7", "hash", "7"),
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
