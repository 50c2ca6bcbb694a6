"""Prompt templates: plain text files with a ``{question}`` placeholder, editable by users.

Built-in templates live in ``curate/templates/<purpose>_<kind>.txt`` (purpose ``answer_only`` for the
answer-entropy probe, ``cot`` for teacher traces; kind ``numeric``, ``choice`` for a question with its
lettered options inside, or ``options`` for a multiple-choice example whose options are a list in its
``choices`` field). Anywhere a template is asked for, a path to your own file works too. A template's version
is the hash of its text, recorded with every row made from it, so editing a template never mixes old and new
rows under one key.

Sections: a first line ``[system]`` starts a system message, ``[user]`` the user turn (the default when a
template has no sections), ``[assistant]`` the start of the assistant's reply, written for the model (a
prefill such as "The final answer is"; small models asked for "only the answer" mostly start with a word).
Placeholders: ``{question}`` (the last user turn), ``{options}`` (the ``choices`` field, numbered ``1. ...``
per line, as the complexity-aware reference prompt has them) and ``{subject}`` (the ``subject`` field; the
words " about {subject}" are dropped when an example has none).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from curate.kernel.answers import kind_of
from curate.kernel.chat_tokens import prompt_turns, render

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"  # package data of curate
KINDS = ("numeric", "choice", "options")
PLACEHOLDER = "{question}"
_SECTION = re.compile(r"^\[(system|user|assistant)\]\s*$", re.MULTILINE)

Message = dict[str, str]


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # built-in kind ("numeric", "choice", "options") or the file path
    text: str

    def sections(self) -> dict[str, str]:
        """The template's text per section (system, user, assistant); no markers: all of it is the user turn."""
        parts = _SECTION.split(self.text)
        if len(parts) == 1:
            return {"user": self.text.strip()}
        found = {"user": parts[0].strip()} if parts[0].strip() else {}
        for role, body in zip(parts[1::2], parts[2::2]):
            found[role] = body.strip("\n") if role != "assistant" else body.strip()
        return found

    @property
    def prefill(self) -> str:
        """The start of the assistant's reply ("" if the template has none)."""
        return self.sections().get("assistant", "")

    @property
    def version(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    def apply(self, messages: Sequence[Message], fields: dict[str, Any] | None = None) -> list[Message]:
        """The conversation up to the last user turn, whose content is put into the template (with the options
        and subject from ``fields``); the template's system section replaces the conversation's system turns.

        Trailing assistant turns (the answer in the data) are dropped: the model is asked afresh."""
        turns = prompt_turns(messages)
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("the example has no user turn to ask")
        sections = self.sections()
        fill = _filler(turns[-1]["content"].strip(), fields or {})
        asked = [{"role": "user", "content": fill(sections.get("user", PLACEHOLDER)).rstrip()}]
        if "system" in sections:
            return [{"role": "system", "content": fill(sections["system"]).strip()}, *asked]
        return [*turns[:-1], *asked]

    def render_prompt(self, tokenizer: Any, asked: Sequence[Message]) -> str:
        """The text the model continues: ``asked`` (from :meth:`apply`) in the chat template, then the prefill."""
        return render(tokenizer, asked, generation_prompt=True) + self.prefill

    def needs_options(self) -> bool:
        return "{options}" in self.text


def _filler(question: str, fields: dict[str, Any]):
    choices = fields.get("choices")
    subject = fields.get("subject")

    def fill(text: str) -> str:
        if "{options}" in text:
            if not isinstance(choices, list) or not choices:
                raise ValueError("the template lists {options}, but the example has no choices field")
            text = text.replace("{options}", "\n".join(f"{i}. {str(c).strip()}" for i, c in enumerate(choices, start=1)))
        text = text.replace("{subject}", str(subject)) if subject else text.replace(" about {subject}", "").replace("{subject}", "")
        return text.replace(PLACEHOLDER, question)

    return fill


def load_template(spec: str, *, purpose: str) -> PromptTemplate:
    """``spec`` is a built-in kind (numeric, choice, options) or a path to a text file containing ``{question}``."""
    path = TEMPLATE_DIR / f"{purpose}_{spec}.txt" if spec in KINDS else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {spec!r} not found: give one of {', '.join(KINDS)} or a text file path")
    text = path.read_text(encoding="utf-8").strip()
    template = PromptTemplate(spec, text)
    if PLACEHOLDER not in template.sections().get("user", "") + template.sections().get("system", ""):
        raise ValueError(f"prompt template {path} has no {PLACEHOLDER} placeholder for the question")
    return template


def templates_for(spec: str, *, purpose: str) -> dict[str, PromptTemplate]:
    """``auto``: one template per kind, picked per example; else one for all."""
    if spec == "auto":
        return {kind: load_template(kind, purpose=purpose) for kind in KINDS if (TEMPLATE_DIR / f"{purpose}_{kind}.txt").is_file()}
    return {"any": load_template(spec, purpose=purpose)}


def example_kind(reference_answer: str | None, fields: dict[str, Any]) -> str:
    """``options`` for a multiple-choice example with a ``choices`` list, ``choice`` when the reference is an
    option letter, else ``numeric``."""
    kind = kind_of(reference_answer)
    return "options" if kind == "choice" and isinstance(fields.get("choices"), list) and fields["choices"] else kind


def pick(templates: dict[str, PromptTemplate], reference_answer: str | None, fields: dict[str, Any] | None = None) -> tuple[str, PromptTemplate]:
    """The answer kind of an example and the template that asks it."""
    kind = example_kind(reference_answer, fields or {})
    template = templates.get(kind) or (templates.get("choice") if kind == "options" else None) or templates.get("any")
    if template is None:
        raise ValueError(f"no template for {kind} examples; give --template / --prompt with one for them")
    if kind == "options" and not template.needs_options():
        kind = "choice"  # a template that shows no numbered options: the letters in the question are the answer
    return kind, template
