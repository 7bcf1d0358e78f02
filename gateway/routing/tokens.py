"""Prompt token counting with the model's own tokenizer: a cheap bound first, exact near limits.

`PromptCounter()` is one per process. It loads the two tokenizers lazily, on the first exact
count that needs each: `tokenizer_data/v1.tokenizer.json` (WizardLM-2) and `v3.tokenizer.json`
(Mixtral-8x22B-Instruct), generated once from mistral-common's SentencePiece files by
`scripts/make_tokenizer_json.py` and read with the `tokenizers` package only (no sentencepiece,
mistral-common or torch in the gateway). Their ids equal SentencePiece's (tests/test_tokens.py).

A chat is first rendered to the segments of its prompt format
(`local_backend/formats/prompt_format.py`, the same rendering the local backend encodes, so
counts agree with its prompt length). Then:

- `upper_bound`: no tokenization. Each control segment is one token; a text segment of B UTF-8
  bytes is at most B + 1 tokens. Why: SentencePiece BPE starts from one symbol per character of
  "▁" + text (the dummy prefix, spaces become "▁"), merges only ever join symbols, and a
  character that is no piece falls back to its UTF-8 bytes, one token each -- so at most one
  token per byte plus one for the prefix. The template's own text (role tags, the default
  system prompt, tool JSON, separators) is in the segments, so its overhead is included.
- `count_chat`: exact, by encoding the segments.
- `fits`: `upper_bound + max_tokens <= context` decides without tokenizing (microseconds for a
  short chat); only a prompt whose bound does not fit is counted exactly.

Chats the model's own format cannot encode (tools with WizardLM-2, a chat ending with an
assistant message, ...) raise ChatFormatError from `count_chat`. `fits`, `count` and `bound`
(the router's and accountant's entry points) do not raise for them: they count a neutral
rendering instead -- each message's role and text (tool calls and tool JSON included) between
control tokens -- an estimate for routes that use their own template.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from local_backend.formats import TOKENIZER_DATA_DIR, TOKENIZER_FILES
from local_backend.formats.prompt_format import (
    BOS,
    EOS,
    FORMAT_TOKENIZER,
    ChatFormatError,
    Segment,
    format_for_model,
    render_chat,
)
from local_backend.formats.spm_tokenizer import SpmJsonTokenizer

DATA_DIR = TOKENIZER_DATA_DIR


def _nbytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def segments_upper_bound(segments: Sequence[Segment]) -> int:
    """At most this many tokens: 1 per control id, UTF-8 bytes + 1 per text (see module doc)."""
    return sum(1 if isinstance(s, int) else _nbytes(s) + 1 for s in segments)


def neutral_segments(messages: Any, tools: Any = None) -> list[Segment]:
    """A format-free rendering of any chat, for estimates: [BOS] ("role: text" EOS)* [tools]."""
    segments: list[Segment] = [BOS]
    for message in messages if isinstance(messages, Sequence) else ():
        if not isinstance(message, Mapping):
            continue
        parts = [f"{message.get('role')}:"]
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, Sequence):
            parts += [p["text"] for p in content if isinstance(p, Mapping) and "text" in p]
        for key in ("tool_calls", "tool_call_id", "name"):
            if message.get(key):
                parts.append(json.dumps(message[key], ensure_ascii=False, default=str))
        segments += [" ".join(str(p) for p in parts), EOS]
    if tools:
        segments.append(json.dumps(tools, ensure_ascii=False, default=str))
    return segments


class PromptCounter:
    """Counts prompts per model; `model` is a format or model name, or has `.chat_format`."""

    def __init__(self, data_dir: Path = DATA_DIR) -> None:
        self._data_dir = data_dir
        self._tokenizers: dict[str, SpmJsonTokenizer] = {}
        self._lock = threading.Lock()

    def tokenizer(self, name: str) -> SpmJsonTokenizer:
        """The "v1" or "v3" tokenizer, loaded on first use (about 0.2 s each)."""
        if (loaded := self._tokenizers.get(name)) is not None:
            return loaded
        if name not in TOKENIZER_FILES:
            raise ValueError(f"unknown tokenizer {name!r} (known: v1, v3)")
        with self._lock:
            if name not in self._tokenizers:
                path = self._data_dir / TOKENIZER_FILES[name]
                self._tokenizers[name] = SpmJsonTokenizer.from_file(path)
            return self._tokenizers[name]

    # -- chats, by prompt format ---------------------------------------------------------------

    def upper_bound(self, model: Any, messages: Any, tools: Any = None) -> int:
        """Never below the exact count; no tokenization (see the module doc)."""
        return segments_upper_bound(self._segments(_format(model), messages, tools))

    def count_chat(self, model: Any, messages: Any, tools: Any = None) -> int:
        """The exact prompt length in the model's format; ChatFormatError if it cannot encode it."""
        fmt = _format(model)
        return self._exact(fmt, render_chat(fmt, messages, tools))

    def fits(self, model: Any, messages: Any, tools: Any, max_tokens: int, context: int) -> bool:
        """prompt + max_tokens <= context, tokenizing only when the cheap bound says maybe not."""
        fmt = _format(model)
        segments = self._segments(fmt, messages, tools)
        if segments_upper_bound(segments) + max_tokens <= context:
            return True
        return self._exact(fmt, segments) + max_tokens <= context

    # -- the router's and accountant's protocol (gateway/routing_prompt.py, accounting.py) -----

    def count(self, model: Any, body: Mapping[str, Any], endpoint: str) -> int:
        """Prompt tokens of a request body: exact in the model's format, else the estimate."""
        fmt = _format(model)
        if endpoint == "completions":
            return self._completion_prompt(fmt, body.get("prompt"))
        segments = self._segments(fmt, body.get("messages"), body.get("tools"))
        return self._exact(fmt, segments)

    def bound(self, model: Any, body: Mapping[str, Any], endpoint: str) -> int:
        """A sound upper bound of `count` without tokenizing."""
        fmt = _format(model)
        if endpoint == "completions":
            # BOS + a text's bound, or the ids as they are
            prompts = _prompts(body.get("prompt"))
            return sum(len(p) if _is_ids(p) else 1 + _nbytes(p) + 1 for p in prompts)
        return segments_upper_bound(self._segments(fmt, body.get("messages"), body.get("tools")))

    def count_text(self, model: Any, text: str) -> int:
        """Tokens of plain text (no BOS), e.g. a completion the gateway served."""
        ids = self.tokenizer(FORMAT_TOKENIZER[_format(model)]).encode(text)
        return len(ids)

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _segments(fmt: str, messages: Any, tools: Any) -> list[Segment]:
        """The model's own prompt format when it can encode the chat, else the neutral one."""
        try:
            return render_chat(fmt, messages, tools)
        except ChatFormatError:
            return neutral_segments(messages, tools)

    def _exact(self, fmt: str, segments: Sequence[Segment]) -> int:
        texts = [s for s in segments if isinstance(s, str)]
        encoded = self.tokenizer(FORMAT_TOKENIZER[fmt]).encode_batch(texts)
        return len(segments) - len(texts) + sum(len(ids) for ids in encoded)

    def _completion_prompt(self, fmt: str, prompt: Any) -> int:
        """BOS + the text's tokens per prompt; prompts given as token ids count as they are."""
        prompts = _prompts(prompt)
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = self.tokenizer(FORMAT_TOKENIZER[fmt]).encode_batch(texts) if texts else []
        return sum(1 + len(ids) for ids in encoded) + sum(len(p) for p in prompts if _is_ids(p))


def _format(model: Any) -> str:
    """The prompt format of a catalog Model (checking its tokenizer) or of a format/model name."""
    if isinstance(model, str):
        return format_for_model(model)
    fmt = format_for_model(model.chat_format)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer != FORMAT_TOKENIZER[fmt]:
        raise ValueError(
            f"model {getattr(model, 'id', model)!r}: format {fmt} uses tokenizer "
            f"{FORMAT_TOKENIZER[fmt]}, not {tokenizer}"
        )
    return fmt


def _is_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)


def _prompts(prompt: Any) -> list[Any]:
    """A completions `prompt` as a list of prompts (each a string or a list of token ids)."""
    if isinstance(prompt, str) or (_is_ids(prompt) and prompt):
        return [prompt]
    if isinstance(prompt, list):
        return [p for p in prompt if isinstance(p, str) or _is_ids(p)]
    return []
