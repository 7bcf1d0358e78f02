"""Chat prompts as token ids for the local backend, and tool calls read back from its output.

The formats themselves (Vicuna for WizardLM-2, [INST] v3 for Mixtral-8x22B-Instruct) are
rendered by `local_backend.formats.prompt_format` -- pure Python shared with the gateway's
token counter, so both count the same prompt; see its module doc for the exact forms. Here the
segments become ids:
control segments are placed by id, each text segment is encoded on its own.

    encoder = ChatEncoder(Tokenizer.for_model("mixtral-8x22b-instruct"), "mixtral-8x22b-instruct")
    prompt_ids = encoder.encode(messages, tools)                    # OpenAI-shaped input
    message = encoder.parse_output(generated_ids)                   # OpenAI assistant message

Invalid chats raise `ChatFormatError` (a ValueError) with a message for the client.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from local_backend.formats.prompt_format import (
    CONTROL_PIECES,
    FORMAT_TOKENIZER,
    MISTRAL_V3,
    TOOL_CALLS,
    ChatFormatError,
    Segment,
    format_for_model,
    render_chat,
)
from local_backend.tokenizer import Tokenizer

__all__ = [
    "ChatEncoder",
    "ChatFormatError",
    "ToolCallParseError",
    "encode_chat",
    "encode_segments",
    "parse_tool_calls",
]

_ID_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ToolCallParseError(ValueError):
    """The text after [TOOL_CALLS] is not a readable list of calls."""


def encode_segments(tokenizer: Tokenizer, segments: Sequence[Segment]) -> list[int]:
    """Control ids as they are, each text encoded on its own (one batched call)."""
    texts = [s for s in segments if isinstance(s, str)]
    encoded = iter(tokenizer.encode_batch(texts))
    ids: list[int] = []
    for segment in segments:
        if isinstance(segment, int):
            ids.append(segment)
        else:
            ids.extend(next(encoded))
    return ids


class ChatEncoder:
    """A tokenizer bound to a prompt format (a format name, or a model name to infer it from)."""

    def __init__(self, tokenizer: Tokenizer, model_or_format: str) -> None:
        self.tokenizer = tokenizer
        self.format = format_for_model(model_or_format)
        for token_id, piece in CONTROL_PIECES[self.format].items():
            if token_id >= tokenizer.vocab_size or tokenizer.id_to_piece(token_id) != piece:
                raise ValueError(
                    f"format {self.format} needs a {FORMAT_TOKENIZER[self.format]} tokenizer with "
                    f"{piece!r} at id {token_id}; {tokenizer.source} does not have it"
                )

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation ends at EOS in both formats."""
        return [self.tokenizer.eos_id]

    def encode(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any] | None = None,
        *,
        continue_final_message: bool = False,
    ) -> list[int]:
        """The prompt's ids (BOS first), ending where the model writes the assistant's answer.

        `continue_final_message`: the chat ends with a partial assistant message that the
        model continues (no EOS after it, no new generation prompt)."""
        segments = render_chat(
            self.format, messages, tools, continue_final_message=continue_final_message
        )
        return encode_segments(self.tokenizer, segments)

    def parse_output(self, generated_ids: Sequence[int]) -> dict[str, Any]:
        """An OpenAI assistant message from generated ids (without the final EOS).

        v3 models call tools by writing [TOOL_CALLS] and a JSON list; the text before it (if
        any) stays `content`. When the JSON cannot be read (e.g. the answer was cut by
        max_tokens) the whole output is returned as plain content -- best effort, never an
        error for the client."""
        ids = list(generated_ids)
        if self.format == MISTRAL_V3 and TOOL_CALLS in ids:
            at = ids.index(TOOL_CALLS)
            try:
                calls = parse_tool_calls(self.tokenizer.decode(ids[at + 1 :]))
            except ToolCallParseError:
                pass
            else:
                content = self.tokenizer.decode(ids[:at]).strip()
                return {"role": "assistant", "content": content or None, "tool_calls": calls}
            text = self.tokenizer.decode(ids[:at]) + self.tokenizer.decode(ids[at + 1 :])
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": self.tokenizer.decode(ids)}


def encode_chat(
    tokenizer: Tokenizer,
    model_or_format: str,
    messages: Sequence[Any],
    tools: Sequence[Any] | None = None,
    *,
    continue_final_message: bool = False,
) -> list[int]:
    """One-shot `ChatEncoder(tokenizer, model_or_format).encode(...)`."""
    encoder = ChatEncoder(tokenizer, model_or_format)
    return encoder.encode(messages, tools, continue_final_message=continue_final_message)


def new_tool_call_id() -> str:
    """9 random letters/digits: the id shape v3 models were trained with (kept by the encoder)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` from the JSON a v3 model writes after [TOOL_CALLS].

    Best effort, as models write it: `[{"name": ..., "arguments": {...}}, ...]`. Accepted too:
    surrounding whitespace and anything after the first JSON value (a stray "</s>"), a single
    object instead of a list, `arguments` given as a JSON string or missing ({}), an `id`
    (kept; otherwise a fresh 9-character id, which the v3 encoder keeps as is when the client
    sends the call back). Raises ToolCallParseError when no list of named calls can be read."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text.strip())
    except json.JSONDecodeError as exc:
        raise ToolCallParseError(f"tool calls are not JSON: {exc.msg}") from exc
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise ToolCallParseError("tool calls must be a non-empty JSON list")
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ToolCallParseError("each tool call needs a name")
        arguments = item.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = item.get("id")
        calls.append(
            {
                "id": call_id if isinstance(call_id, str) and call_id else new_tool_call_id(),
                "type": "function",
                "function": {"name": item["name"], "arguments": arguments},
            }
        )
    return calls
