"""Prompt templates: plain text files with a ``{question}`` placeholder, editable by users.

Built-in templates live in ``curate/templates/<purpose>_<kind>.txt`` (purpose ``answer_only`` for the
answer-entropy probe, ``cot`` for teacher traces; kind ``numeric`` or ``choice``). Anywhere a template is
asked for, a path to your own file works too. A template's version is the hash of its text, recorded with
every row made from it, so editing a template never mixes old and new rows under one key.

A line ``[assistant]`` splits a template in two: above it, the user turn; below it, the start of the
assistant's reply, written for the model (a prefill such as "The final answer is"). Small models asked for
"only the answer" mostly start with a word ("To", "The"); the prefill makes their first token the answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from curate.kernel.answers import KINDS, kind_of
from curate.kernel.chat_tokens import prompt_turns, render

TEMPLATE_DIR = Path(__file__).parent / "templates"
PLACEHOLDER = "{question}"
PREFILL_MARKER = "\n[assistant]\n"

Message = dict[str, str]


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # built-in kind ("numeric", "choice") or the file path
    text: str

    @property
    def user_text(self) -> str:
        return self.text.split(PREFILL_MARKER, 1)[0].rstrip()

    @property
    def prefill(self) -> str:
        """The start of the assistant's reply ("" if the template has none)."""
        parts = self.text.split(PREFILL_MARKER, 1)
        return parts[1].strip() if len(parts) == 2 else ""

    @property
    def version(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    def apply(self, messages: Sequence[Message]) -> list[Message]:
        """The conversation up to the last user turn, whose content is put into the template.

        Trailing assistant turns (the answer in the data) are dropped: the model is asked afresh."""
        turns = prompt_turns(messages)
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("the example has no user turn to ask")
        last = turns[-1]
        return turns[:-1] + [{"role": "user", "content": self.user_text.replace(PLACEHOLDER, last["content"].strip())}]

    def render_prompt(self, tokenizer: Any, asked: Sequence[Message]) -> str:
        """The text the model continues: ``asked`` (from :meth:`apply`) in the chat template, then the prefill."""
        return render(tokenizer, asked, generation_prompt=True) + self.prefill


def load_template(spec: str, *, purpose: str) -> PromptTemplate:
    """``spec`` is a built-in kind (numeric, choice) or a path to a text file containing ``{question}``."""
    path = TEMPLATE_DIR / f"{purpose}_{spec}.txt" if spec in KINDS else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {spec!r} not found: give one of {', '.join(KINDS)} or a text file path")
    text = path.read_text(encoding="utf-8").strip()
    if PLACEHOLDER not in text.split(PREFILL_MARKER, 1)[0]:
        raise ValueError(f"prompt template {path} has no {PLACEHOLDER} placeholder for the question")
    return PromptTemplate(spec, text)


def templates_for(spec: str, *, purpose: str) -> dict[str, PromptTemplate]:
    """``auto``: one template per kind, picked per example by its reference answer; else one for all."""
    if spec == "auto":
        return {kind: load_template(kind, purpose=purpose) for kind in KINDS}
    return {"any": load_template(spec, purpose=purpose)}


def pick(templates: dict[str, PromptTemplate], reference_answer: str | None) -> tuple[str, PromptTemplate]:
    """The answer kind of an example and the template that asks it."""
    kind = kind_of(reference_answer)
    return kind, templates.get(kind) or templates["any"]
