"""OpenAI-shaped chat messages, parsed and grouped into turns for the prompt formats.

Accepts dicts (or pydantic models, through `model_dump`) with role / content / tool_calls /
tool_call_id / name; "developer" is read as "system". Content is a string, None, or a list of
text parts whose texts are joined with a blank line (mistral-common's join). The grouping rules
(`merge_turns`, `system_prompt`) are mistral-common's, shared by both formats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JOIN = "\n\n"  # between texts merged into one turn (mistral-common's join)
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # function names, as mistral-common validates them
ROLES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system role
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


class ChatFormatError(ValueError):
    """The chat cannot be written in the model's prompt format; the message says why."""


# -- parsing OpenAI messages -------------------------------------------------------------------


@dataclass
class Call:
    name: str
    arguments: Any  # parsed JSON, or the raw string when it is not JSON
    id: str | None


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    text: str
    has_content: bool  # the raw content was truthy (mistral-common's test for "has content")
    content_is_none: bool = False
    calls: list[Call] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


def parse_json(text: str) -> Any:
    """The JSON value of `text`, or `text` itself when it is not JSON (as mistral-common does)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not is_list(content):
        raise ChatFormatError(f"{where}.content must be a string or a list of text parts")
    texts = []
    for index, raw in enumerate(content):
        part = as_mapping(raw)
        if part is None or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if part is not None else type(raw).__name__
            raise ChatFormatError(
                f"{where}.content[{index}]: only text parts are supported (got {kind!r})"
            )
        if part["text"]:
            texts.append(part["text"])
    return JOIN.join(texts)


def as_mapping(value: Any) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)  # pydantic models (the servers' parsed bodies)
    return dump(exclude_none=True) if callable(dump) else None


def _call(raw: Any, where: str) -> Call:
    call = as_mapping(raw)
    function = as_mapping(call.get("function")) if call is not None else None
    if function is None or not isinstance(function.get("name"), str):
        raise ChatFormatError(f"{where}: a tool call needs function.name")
    if not NAME.fullmatch(function["name"]):
        raise ChatFormatError(
            f"{where}: function name {function['name']!r} must match [a-zA-Z0-9_-]{{1,64}}"
        )
    arguments = function.get("arguments")
    if isinstance(arguments, Mapping):
        parsed: Any = dict(arguments)
    elif arguments is None or isinstance(arguments, str):
        parsed = parse_json(arguments or "{}")
    else:
        raise ChatFormatError(f"{where}: function.arguments must be a JSON string")
    call_id = call.get("id") if call is not None else None
    return Call(function["name"], parsed, call_id if isinstance(call_id, str) else None)


def is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def parse_messages(messages: Sequence[Any]) -> list[Message]:
    if not is_list(messages):
        raise ChatFormatError("messages must be a list")
    if not messages:
        raise ChatFormatError("the chat has no messages")
    out = []
    for index, raw in enumerate(messages):
        where = f"messages[{index}]"
        message = as_mapping(raw)
        if message is None:
            raise ChatFormatError(f"{where} must be an object")
        raw_role = message.get("role")
        role = ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise ChatFormatError(f"{where}: unsupported role {message.get('role')!r}")
        content = message.get("content")
        parsed = Message(role, _text(content, where), bool(content), content is None)
        if role == "assistant":
            calls = message.get("tool_calls") or ()
            if not is_list(calls):
                raise ChatFormatError(f"{where}.tool_calls must be a list")
            parsed.calls = [_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
        if role == "tool":
            call_id, name = message.get("tool_call_id"), message.get("name")
            parsed.tool_call_id = call_id if isinstance(call_id, str) else None
            parsed.name = name if isinstance(name, str) else None
        out.append(parsed)
    return out


# -- grouping shared by both formats -------------------------------------------------------------


def system_prompt(messages: list[Message]) -> str | None:
    texts = [m.text for m in messages if m.role == "system" and m.has_content]
    return JOIN.join(texts) if texts else None


def merge_turns(messages: list[Message]) -> list[Message]:
    """Consecutive messages of one role become one turn; system messages are dropped (but still
    separate the turns around them); tool messages stay one per result (mistral-common's rules)."""
    turns: list[Message] = []
    previous = None
    for message in messages:
        same = previous == message.role and message.role in ("user", "assistant")
        previous = message.role
        if message.role == "system":
            continue
        if same:
            turn = turns[-1]
            turn.text = JOIN.join(t for t in (turn.text, message.text) if t)
            turn.calls = turn.calls + message.calls
        else:
            turns.append(
                Message(
                    message.role,
                    message.text,
                    message.has_content,
                    calls=message.calls,
                    tool_call_id=message.tool_call_id,
                    name=message.name,
                )
            )
    return turns
