"""The prompt formats of the served models, rendered to segments: pure Python, no tokenizer.

A rendered prompt is a list of segments. An `int` is a control token placed by id (BOS, EOS,
[INST], ...): it never comes from text, so a user typing "[INST]" cannot forge one. A `str` is
text that the tokenizer encodes on its own -- SentencePiece adds its dummy-prefix "▁" to each
segment, as mistral-common does for each message and Hugging Face's (legacy) Llama tokenizer
does after each special token. The local backend (`local_backend/chat_format.py`, exact ids)
and the gateway's counter (`gateway/routing/tokens.py`) encode these same segments, which is why the
gateway's count equals the backend's prompt length; it lives with the model, torch-free, so
the light gateway install imports it (local_backend/formats/__init__.py).

Formats (chosen by `format_for_model`):

vicuna (WizardLM-2, v1 tokenizer) -- the form published on the WizardLM-2 model card and in
FastChat's vicuna_v1.1 template (sep " ", sep2 "</s>"):
    <s>{system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:
  segments: [BOS, "{system} USER: {u1} ASSISTANT: {a1}", EOS, "USER: {u2} ASSISTANT:"].
  The system prompt is WIZARDLM2_SYSTEM_PROMPT when the chat has no system message; system
  messages present but all empty give no system text (the prompt starts with "USER:"). The
  generation prompt is "ASSISTANT:" without a trailing space. No tool calling: chats with tools
  raise ChatFormatError.

mistral_v3 (Mixtral-8x22B-Instruct, v3 tokenizer) -- exactly what mistral-common's
InstructTokenizerV3 produces after its request normalization (tests/local/test_chat_format.py
compares ids): system messages are joined by a blank line and prepended, with "\\n\\n", to the
LAST user turn; consecutive messages of one role are merged ("\\n\\n" between texts);
an empty user turn is inserted when the chat does not start with one;
    [BOS] ([AVAILABLE_TOOLS] tools-json [/AVAILABLE_TOOLS] before the last user turn)
    [INST] text [/INST] | assistant text.rstrip(" ") [EOS]
    | [TOOL_CALLS] [{"name", "arguments", "id"}...] [EOS]
    | [TOOL_RESULTS] {"content", "call_id"} [/TOOL_RESULTS]
  Tool-call ids that are not 9 letters/digits (OpenAI's "call_..." ids) are mapped to 9
  deterministic base-62 characters by `mistral_tool_call_id`, in calls and results alike.

Content given as a list of parts must be text parts; their texts are joined with "\\n\\n".
Invalid chats raise ChatFormatError (a ValueError) with a message a client can act on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from local_backend.formats.chat_messages import (
    JOIN,
    NAME,
    Call,
    ChatFormatError,
    Message,
    as_mapping,
    is_list,
    merge_turns,
    parse_json,
    parse_messages,
    system_prompt,
)

Segment = int | str

BOS, EOS = 1, 2
INST, END_INST, TOOL_CALLS = 3, 4, 5
AVAILABLE_TOOLS, END_AVAILABLE_TOOLS, TOOL_RESULTS, END_TOOL_RESULTS = 6, 7, 8, 9
# The pieces those ids must carry in the tokenizer a format is used with.
CONTROL_PIECES = {
    "vicuna": {BOS: "<s>", EOS: "</s>"},
    "mistral_v3": {
        BOS: "<s>",
        EOS: "</s>",
        INST: "[INST]",
        END_INST: "[/INST]",
        TOOL_CALLS: "[TOOL_CALLS]",
        AVAILABLE_TOOLS: "[AVAILABLE_TOOLS]",
        END_AVAILABLE_TOOLS: "[/AVAILABLE_TOOLS]",
        TOOL_RESULTS: "[TOOL_RESULTS]",
        END_TOOL_RESULTS: "[/TOOL_RESULTS]",
    },
}
VICUNA, MISTRAL_V3 = "vicuna", "mistral_v3"
FORMAT_TOKENIZER = {VICUNA: "v1", MISTRAL_V3: "v3"}  # tokenizer name of each format

WIZARDLM2_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
_MISTRAL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_BASE62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# mistral-common's allowed role transitions
_NEXT_ROLES = {
    "system": {"user", "assistant", "system"},
    "user": {"assistant", "system", "user"},
    "assistant": {"assistant", "user", "tool"},
    "tool": {"assistant", "tool", "user"},
}


def format_for_model(name: str) -> str:
    """The format ("vicuna" | "mistral_v3") of a format or model name (provider prefix allowed)."""
    key = name.strip().lower()
    if key in FORMAT_TOKENIZER:
        return key
    base = key.rsplit("/", 1)[-1]
    if base.startswith("wizardlm-2"):
        return VICUNA
    if base.startswith("mixtral-") and "instruct" in base:
        return MISTRAL_V3
    raise ValueError(f"no prompt format is known for model {name!r}")


def render_chat(
    fmt: str,
    messages: Sequence[Any],
    tools: Sequence[Any] | None = None,
    *,
    continue_final_message: bool = False,
) -> list[Segment]:
    """The prompt segments of an OpenAI-shaped chat in format `fmt` (see the module doc)."""
    if fmt == VICUNA:
        return render_vicuna(messages, tools, continue_final_message=continue_final_message)
    if fmt == MISTRAL_V3:
        return render_mistral_v3(messages, tools, continue_final_message=continue_final_message)
    raise ValueError(f"unknown prompt format {fmt!r}")


def mistral_tool_call_id(call_id: str) -> str:
    """A tool-call id as v3 models saw them in training: 9 letters/digits (others are hashed)."""
    if _MISTRAL_CALL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "".join(chars)


# -- vicuna (WizardLM-2) ------------------------------------------------------------------------


def render_vicuna(
    messages: Sequence[Any],
    tools: Sequence[Any] | None = None,
    *,
    continue_final_message: bool = False,
) -> list[Segment]:
    parsed = parse_messages(messages)
    if tools or any(m.role == "tool" or m.calls for m in parsed):
        raise ChatFormatError("WizardLM-2's prompt format (Vicuna) has no tool calling")
    turns = merge_turns(parsed)
    continues = continue_final_message and bool(turns) and turns[-1].role == "assistant"
    if not turns or (turns[-1].role != "user" and not continues):
        raise ChatFormatError("the last message must be from the user")
    has_system = any(m.role == "system" for m in parsed)
    system = system_prompt(parsed) if has_system else WIZARDLM2_SYSTEM_PROMPT
    segments: list[Segment] = [BOS]
    text = f"{system} " if system else ""
    for index, turn in enumerate(turns):
        if turn.role == "user":
            text += f"USER: {turn.text} "
            continue
        text += f"ASSISTANT: {turn.text}"
        if continue_final_message and index == len(turns) - 1:
            return _drop_empty([*segments, text])
        segments += [text, EOS]
        text = ""
    return _drop_empty([*segments, text + "ASSISTANT:"])


def _drop_empty(segments: list[Segment]) -> list[Segment]:
    return [s for s in segments if s != ""]


# -- mistral v3 (Mixtral-8x22B-Instruct) ---------------------------------------------------------


def _validate_v3(parsed: list[Message], continue_final_message: bool) -> None:
    """mistral-common's checks (its "test" mode) that apply to text chats, plus two it defers:
    tool results must answer an outstanding call, and calls are answered before the user speaks."""
    for index, message in enumerate(parsed):
        where = f"messages[{index}]"
        if message.role == "system" and message.content_is_none:
            raise ChatFormatError(f"{where}: a system message needs content")
        if message.role == "assistant" and message.has_content == bool(message.calls):
            raise ChatFormatError(
                f"{where}: an assistant message needs either content or tool_calls (not both)"
            )
        if message.role == "tool":
            if message.tool_call_id is None:
                raise ChatFormatError(f"{where}: a tool message needs tool_call_id")
            if message.name is not None and not NAME.fullmatch(message.name):
                raise ChatFormatError(
                    f"{where}: name {message.name!r} must match [a-zA-Z0-9_-]{{1,64}}"
                )
    if len(parsed) == 1 and parsed[0].role not in ("user", "system"):
        raise ChatFormatError("a one-message chat must be a user or system message")
    last = parsed[-1].role
    if (
        len(parsed) > 1
        and last not in ("user", "tool")
        and not (continue_final_message and last == "assistant")
    ):
        raise ChatFormatError("the last message must be from the user or a tool")
    outstanding, caller = 0, 0
    for index, (before, message) in enumerate(zip([None, *parsed], parsed, strict=False)):
        if before is not None and message.role not in _NEXT_ROLES[before.role]:
            raise ChatFormatError(
                f"messages[{index}]: a {message.role} message cannot follow a {before.role} message"
            )
        if message.role == "tool":
            if outstanding == 0:
                raise ChatFormatError(
                    f"messages[{index}]: a tool message must answer a tool call "
                    "of the assistant message before it"
                )
            outstanding -= 1
        elif outstanding and message.role in ("assistant", "user"):
            raise ChatFormatError(
                f"messages[{caller}]: every tool call needs a tool message answering it"
            )
        if message.role == "assistant" and message.calls:
            outstanding, caller = len(message.calls), index


def _v3_tools(tools: Sequence[Any]) -> str:
    if not is_list(tools):
        raise ChatFormatError("tools must be a list")
    rendered = []
    for index, raw in enumerate(tools):
        where = f"tools[{index}]"
        tool = as_mapping(raw)
        function = as_mapping(tool.get("function")) if tool is not None else None
        if tool is None or tool.get("type", "function") != "function" or function is None:
            raise ChatFormatError(f"{where}: only function tools are supported")
        name, description = function.get("name"), function.get("description") or ""
        parameters = function.get("parameters") or {}
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ChatFormatError(f"{where}: function.name must match [a-zA-Z0-9_-]{{1,64}}")
        if not isinstance(description, str) or not isinstance(parameters, Mapping):
            raise ChatFormatError(f"{where}: description must be a string, parameters an object")
        function_json = {"name": name, "description": description, "parameters": dict(parameters)}
        rendered.append({"type": "function", "function": function_json})
    return json.dumps(rendered, ensure_ascii=False)


def render_mistral_v3(
    messages: Sequence[Any],
    tools: Sequence[Any] | None = None,
    *,
    continue_final_message: bool = False,
) -> list[Segment]:
    parsed = parse_messages(messages)
    _validate_v3(parsed, continue_final_message)
    system = system_prompt(parsed)
    turns = merge_turns(parsed)
    if not turns or turns[0].role != "user":
        turns.insert(0, Message("user", "", False))
    last_user = max(i for i, turn in enumerate(turns) if turn.role == "user")
    tools_json = _v3_tools(tools) if tools else None
    segments: list[Segment] = [BOS]
    for index, turn in enumerate(turns):
        if turn.role == "user":
            text = turn.text
            if index == last_user:
                if tools_json is not None:
                    segments += [AVAILABLE_TOOLS, tools_json, END_AVAILABLE_TOOLS]
                if system:
                    text = system + JOIN + text
            segments += [INST, text, END_INST]
        elif turn.role == "tool":
            assert turn.tool_call_id is not None
            result = {
                "content": parse_json(turn.text or "{}"),
                "call_id": mistral_tool_call_id(turn.tool_call_id),
            }
            segments += [TOOL_RESULTS, json.dumps(result, ensure_ascii=False), END_TOOL_RESULTS]
        else:
            if turn.calls and turn.text:
                raise ChatFormatError("consecutive assistant messages mix content and tool_calls")
            if turn.calls:
                calls = [_v3_call(call) for call in turn.calls]
                segments += [TOOL_CALLS, json.dumps(calls, ensure_ascii=False)]
            else:
                segments.append(turn.text.rstrip(" "))
            if not (continue_final_message and index == len(turns) - 1):
                segments.append(EOS)
    return _drop_empty(segments)


def _v3_call(call: Call) -> dict[str, Any]:
    rendered: dict[str, Any] = {"name": call.name, "arguments": call.arguments}
    if call.id and call.id != "null":
        rendered["id"] = mistral_tool_call_id(call.id)
    return rendered
