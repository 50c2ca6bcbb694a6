"""Final-answer extraction, number normalisation and grading, shared by ingest (reference answers), traces
(curate generate) and evaluation (train eval): one ``grade`` decides correctness everywhere.

Styles, tried in this order by ``auto``:
- ``hash``: GSM8K's ``#### 18`` marker (last one wins)
- ``boxed``: LaTeX ``\\boxed{...}`` (last one wins, nested braces handled)
- ``brackets``: ``[[18]]``, the complexity-aware reference's answer format (last one wins)
- ``answer-is``: "the answer is 18", "Answer: 18"
- ``last-number``: the last number in the text

``choice`` (multiple choice, never tried by ``auto``): "Answer: C", "the answer is (B)", ``\\boxed{D}``, or a
line holding only the letter; an option number ("Answer: 2") is accepted too.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

KINDS = ("numeric", "choice", "options")  # options: a multiple-choice answer given as the option's number
STYLES = ("auto", "hash", "boxed", "brackets", "answer-is", "last-number", "choice")

_NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_HASH = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_BRACKETS = re.compile(r"\[\[\s*(.+?)\s*\]\]")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
_LAST_NUMBER = re.compile(_NUMBER)
_OPTION = r"\(?([A-J]|[1-9]\d?)\)?(?![\w])"  # an option letter (capital) or number, maybe in brackets
_CHOICE_PATTERNS = (
    re.compile(r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*(?:(?i:option|choice)\s*)?\**\s*" + _OPTION),
    re.compile(r"\\boxed\{\s*" + _OPTION + r"\s*\}"),
    re.compile(r"\[\[\s*" + _OPTION + r"\s*\]\]"),
    re.compile(r"^\W*" + _OPTION + r"\W*$", re.MULTILINE),
)


def extract_answer(text: str, style: str = "auto") -> str | None:
    """The final answer in ``text`` by ``style``, normalised if it is a number; None if there is none."""
    if style not in STYLES:
        raise ValueError(f"unknown answer style {style!r}; choose one of {', '.join(STYLES)}")
    order = ("hash", "boxed", "brackets", "answer-is", "last-number") if style == "auto" else (style,)
    for one in order:
        found = _EXTRACTORS[one](text)
        if found is not None and found.strip():
            return normalize_answer(found)
    return None


def normalize_answer(answer: str) -> str:
    """A number loses currency signs, thousands separators, units and trailing zeros; text is trimmed."""
    stripped = answer.strip().rstrip(".")
    match = re.fullmatch(r"\$?\s*(" + _NUMBER.replace(r"\$?\s?", "") + r")\s*[a-zA-Z%]*", stripped)
    if match is None:
        return stripped
    number = match.group(1).replace(",", "")
    try:
        value = Decimal(number)
    except InvalidOperation:
        return stripped
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _hash(text: str) -> str | None:
    """After the last ``####``: its leading number when it has one ("#### 200 = 200" -> "200"), else the text."""
    found = _HASH.findall(text)
    if not found:
        return None
    leading = re.match(r"\s*(" + _NUMBER + ")", found[-1])
    return leading.group(1) if leading else found[-1]


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    begin = i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[begin : i - 1] if depth == 0 else None


def _brackets(text: str) -> str | None:
    found = _BRACKETS.findall(text)
    return found[-1] if found else None


def _answer_is(text: str) -> str | None:
    found = _ANSWER_IS.findall(text)
    return found[-1] if found else None


def _last_number(text: str) -> str | None:
    found = _LAST_NUMBER.findall(text)
    return found[-1] if found else None


def _choice(text: str) -> str | None:
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


_EXTRACTORS = {"hash": _hash, "boxed": _boxed, "brackets": _brackets, "answer-is": _answer_is, "last-number": _last_number,
               "choice": _choice}


_LETTER = re.compile(r"[A-Ja-j]")


def kind_of(reference_answer: str | None) -> str:
    """``choice`` when the reference answer is a single option letter (A-J), else ``numeric``."""
    return "choice" if reference_answer is not None and _LETTER.fullmatch(reference_answer.strip()) else "numeric"


def grade(text: str, reference: str | None, *, kind: str | None = None) -> tuple[str | None, bool | None]:
    """The final answer extracted from a completion, and whether it equals the reference (None: no reference).

    ``kind`` (numeric or choice) is read from the reference when not given: a single letter is a
    multiple-choice answer, compared case-insensitively; anything else is compared after normalisation."""
    kind = kind or kind_of(reference)
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; choose one of {', '.join(KINDS)}")
    extracted = extract_answer(text, "auto" if kind == "numeric" else "choice")
    if reference is None:
        return extracted, None
    if extracted is None:
        return None, False
    if kind == "options":  # the reference is a letter, the answer the option's number (A = 1)
        number = str(ord(reference.strip().upper()) - ord("A") + 1) if reference.strip().isalpha() else reference.strip()
        return extracted, extracted.upper() in (number, reference.strip().upper())
    if kind == "choice":
        return extracted, extracted.upper() == reference.strip().upper()
    return extracted, extracted == normalize_answer(reference)
