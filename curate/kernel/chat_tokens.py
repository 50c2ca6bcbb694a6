"""Render a conversation with the model's chat template and say, for every token, which message it
belongs to and whether it is a response token (what SFT trains on).

Response tokens are an assistant message's content plus the end-of-turn token right after it; the
role header (``<|im_start|>assistant\\n``) and the template's glue between turns are not. Spans come from
rendering growing prefixes of the conversation, so they are exact for any template whose rendering of the
first k messages is a prefix of the rendering of all of them (checked, with a clear error otherwise).

A message's content is looked for inside that message's own stretch of the rendering, last occurrence
first: a template may write text before the first message (SmolLM2's default system prompt), and a short
reply such as "Face" must not be found inside it.

``SPANS_VERSION`` names these rules; it is part of every run key that depends on them (curate.kernel.keys).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

Message = dict[str, str]
OUTSIDE = -1  # message index of tokens that belong to no message (template text after the last turn)
# Bump when the rules below change which tokens are response tokens (a test pins it to this file's code).
SPANS_VERSION = "3"


@dataclass(frozen=True)
class ChatTokens:
    token_ids: list[int]
    message_index: list[int]
    role: list[str | None]
    is_response: list[bool]
    is_end_of_turn: list[bool]  # the end-of-turn token closing a reply (a response token too)

    def __len__(self) -> int:
        return len(self.token_ids)

    def truncated(self, length: int) -> "ChatTokens":
        return ChatTokens(self.token_ids[:length], self.message_index[:length], self.role[:length],
                          self.is_response[:length], self.is_end_of_turn[:length])


class TemplateError(ValueError):
    pass


def template_hash(tokenizer: Any) -> str:
    template = tokenizer.chat_template or ""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def prompt_turns(messages: Sequence[Message]) -> list[Message]:
    """The conversation without its trailing assistant turns: what a model is asked to continue."""
    turns = list(messages)
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns


def with_reply(messages: Sequence[Message], reply: str) -> list[Message]:
    """The conversation with ``reply`` as its (only final) assistant turn, replacing the one in the data."""
    return [*prompt_turns(messages), {"role": "assistant", "content": reply}]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of already-templated text (the template wrote the special tokens: none are added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_chat(tokenizer: Any, messages: Sequence[Message]) -> ChatTokens:
    """Token ids of the templated conversation with per-token message index, role and response flag."""
    if tokenizer.chat_template is None:
        raise TemplateError("the tokenizer has no chat template; pass a model whose tokenizer defines one")
    full = render(tokenizer, messages)
    # message i covers characters [starts[i], starts[i + 1]); its response part is [content[i][0], content[i][1])
    starts = []
    for i in range(len(messages)):
        before = render(tokenizer, messages[:i])
        _require_prefix(before, full, i)
        starts.append(len(before))
    starts.append(len(full))
    response_spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = render(tokenizer, messages[:i], generation_prompt=True)
        _require_prefix(header, full, i)
        begin = full.rfind(message["content"], max(starts[i], len(header)), starts[i + 1])
        if begin < 0:
            raise TemplateError(f"the chat template changes the text of message {i}; cannot locate its content")
        response_spans.append((i, begin, begin + len(message["content"])))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    end_of_turn = set(tokenizer.all_special_ids)
    message_index = [_region(start, starts) for start, _ in offsets]
    roles = [messages[m]["role"] if m != OUTSIDE else None for m in message_index]
    is_response = [False] * len(ids)
    is_end_of_turn = [False] * len(ids)
    for i, begin, end in response_spans:
        inside = [t for t, (s, _) in enumerate(offsets) if begin <= s < end or (s < begin < offsets[t][1])]
        for t in inside:
            is_response[t] = True
        after = (inside[-1] + 1) if inside else next((t for t, (s, _) in enumerate(offsets) if s >= end), len(ids))
        if after < len(ids) and ids[after] in end_of_turn and message_index[after] == i:
            is_response[after] = True  # the end-of-turn token is trained: it teaches the model to stop
            is_end_of_turn[after] = True
    return ChatTokens(ids, message_index, roles, is_response, is_end_of_turn)


# InstructDiff's scoring format (zhuchichi56/Instruct-diff): plain text, no chat template; the response follows
# the prompt after a newline and gets no end-of-sequence token; the tokenizer adds its BOS as it does by default.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Response:")
PROMPT_FORMATS = ("chat", "alpaca")


def tokenize_alpaca(tokenizer: Any, messages: Sequence[Message]) -> ChatTokens:
    """The last user turn in the Alpaca prompt, then a newline and the last reply, as plain text: the
    response tokens are every token after the prompt's (the newline included), as the reference counts them."""
    turns = prompt_turns(messages)
    if not turns or turns[-1]["role"] != "user" or len(turns) == len(messages):
        raise TemplateError("the Alpaca format needs a user turn followed by the reply")
    user = len(turns) - 1
    prompt = ALPACA_PROMPT.format(instruction=turns[-1]["content"])
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    ids = list(tokenizer(prompt + "\n" + messages[-1]["content"])["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise TemplateError("the tokenizer merges the Alpaca prompt's last token with the reply; it cannot be split")
    response = [t >= len(prompt_ids) for t in range(len(ids))]
    return ChatTokens(ids, [len(messages) - 1 if r else user for r in response],
                      ["assistant" if r else "user" for r in response], response, [False] * len(ids))


def tokenize(tokenizer: Any, messages: Sequence[Message], prompt_format: str = "chat") -> ChatTokens:
    """The conversation's tokens in a prompt format: the model's chat template, or the Alpaca plain text."""
    if prompt_format == "chat":
        return tokenize_chat(tokenizer, messages)
    if prompt_format == "alpaca":
        return tokenize_alpaca(tokenizer, messages)
    raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")


def _region(char: int, starts: list[int]) -> int:
    for i in range(len(starts) - 1):
        if starts[i] <= char < starts[i + 1]:
            return i
    return OUTSIDE


def _require_prefix(prefix: str, full: str, index: int) -> None:
    if not full.startswith(prefix):
        raise TemplateError(
            f"the chat template renders messages[:{index}] differently inside the whole conversation, so "
            "per-message token spans cannot be computed exactly for this template"
        )
