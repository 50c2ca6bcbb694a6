"""Turn one source record into canonical chat messages, or say exactly why it cannot be.

Formats (auto-detected by their fields, or forced with ``fmt``):
- ``messages``: OpenAI style, ``{"messages": [{"role", "content"}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}`` with ``human``/``gpt`` remapped
- ``alpaca``: ``instruction``, optional ``input``, ``output`` (optional ``system``)
- ``prompt-completion``: ``prompt`` and ``completion``, each a string or a list of messages
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from curate.store.schema import ROLES

FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# The fields each format reads; the rest of a record goes to ``meta``.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt-completion": ("prompt", "completion", "system"),
}

Message = dict[str, str]


class RecordError(ValueError):
    """A record that cannot become an example; ``reason`` is the short code counted in reports."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def detect_format(record: Mapping[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    raise RecordError(
        "unknown_format",
        f"no known fields (found {sorted(record)[:12]}); pass --format and --map SOURCE=TARGET to name them",
    )


def apply_column_map(record: Mapping[str, Any], column_map: Mapping[str, str]) -> dict[str, Any]:
    """Rename source fields (``--map question=prompt``) before format detection."""
    return {column_map.get(key, key): value for key, value in record.items()}


def to_messages(record: Mapping[str, Any], fmt: str) -> list[Message]:
    """The canonical message list of a record in format ``fmt``; raises :class:`RecordError` if invalid."""
    if fmt == "messages":
        messages = _message_list(record, "messages", role_key="role", text_key="content", roles=None)
    elif fmt == "sharegpt":
        turns = _message_list(record, "conversations", role_key="from", text_key="value", roles=SHAREGPT_ROLES)
        messages = _system(record) + turns
    elif fmt == "alpaca":
        instruction = _text(record, "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordError("wrong_type", f"field 'input' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = _system(record) + [{"role": "user", "content": user}, _assistant(_text(record, "output"))]
    elif fmt == "prompt-completion":
        messages = _system(record) + _side(record, "prompt", "user") + _side(record, "completion", "assistant")
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_conversation(messages)
    return messages


def example_id(messages: list[Message]) -> str:
    """Stable content hash: the same conversation gets the same id in any file, on any machine."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def example_fields(meta: str | None) -> dict[str, Any]:
    """The source fields an example kept in its ``meta`` (choices, subject, category, ...)."""
    try:
        return json.loads(meta or "{}").get("fields") or {}
    except json.JSONDecodeError:
        return {}


def unused_fields(record: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in FORMAT_FIELDS[fmt]}


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def _text(record: Mapping[str, Any], field: str) -> str:
    if field not in record or record[field] is None:
        raise RecordError("missing_field", f"field {field!r} is missing")
    value = record[field]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _system(record: Mapping[str, Any]) -> list[Message]:
    value = record.get("system")
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return [{"role": "system", "content": _text(record, "system")}]


def _side(record: Mapping[str, Any], field: str, role: str) -> list[Message]:
    value = record.get(field)
    if isinstance(value, list):
        return _message_list(record, field, role_key="role", text_key="content", roles=None)
    return [{"role": role, "content": _text(record, field)}]


def _message_list(
    record: Mapping[str, Any], field: str, *, role_key: str, text_key: str, roles: Mapping[str, str] | None
) -> list[Message]:
    if field not in record or record[field] is None:
        raise RecordError("missing_field", f"field {field!r} is missing")
    turns = record[field]
    if not isinstance(turns, list):
        raise RecordError("wrong_type", f"field {field!r} must be a list of messages, got {type(turns).__name__}")
    if not turns:
        raise RecordError("empty_conversation", f"field {field!r} holds no messages")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{field}[{index}]"
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", f"{where} must be an object, got {type(turn).__name__}")
        for key in (role_key, text_key):
            if key not in turn or turn[key] is None:
                raise RecordError("missing_field", f"{where} has no {key!r}")
            if not isinstance(turn[key], str):
                raise RecordError("wrong_type", f"{where}.{key} must be a string, got {type(turn[key]).__name__}")
        role = turn[role_key] if roles is None else roles.get(turn[role_key], turn[role_key])
        if role not in ROLES:
            known = sorted(roles) if roles is not None else list(ROLES)
            raise RecordError("unknown_role", f"{where} has role {turn[role_key]!r}; known roles: {known}")
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def _check_conversation(messages: list[Message]) -> None:
    for index, message in enumerate(messages):
        if not message["content"].strip():
            raise RecordError("empty_content", f"message {index} ({message['role']}) has empty content")
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("no_user_turn", "the conversation has no user message")
    if messages[-1]["role"] != "assistant":
        raise RecordError(
            "not_ending_with_assistant", f"the last message is from {messages[-1]['role']!r}, not the assistant"
        )
