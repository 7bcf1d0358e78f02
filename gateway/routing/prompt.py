"""How big is this request's prompt, for routing: a cheap walk first, the tokenizer only if needed.

The router needs two numbers per model: an upper bound for the context-fit check (never below
the real count, so a route that "fits" really fits) and an estimate for the price of this
request's token mix. `PromptText` walks the body once (UTF-8 byte counts, no copies).

The bound, per model, with a `gateway.routing.tokens.PromptCounter` (the server's case):

- a plain chat (messages with string content, no tools or tool calls):
  `bytes + PER_MESSAGE_BOUND x messages + allowance(model)`, where the allowance is the
  counter's own sound bound of a one-empty-message chat in the model's format (BOS, the default
  system prompt, role tags, generation prompt), computed once per model. Why it is sound: the
  counter bounds a text of B bytes by B + 1 tokens and each control id by 1; the formats copy
  message text verbatim and add per message at most a role tag (" ASSISTANT: ", 12 bytes), an
  EOS, one dummy prefix and a "\\n\\n" join -- under PER_MESSAGE_BOUND. Microseconds, no
  rendering; tests/gateway/test_routing.py checks it against the counter on random chats;
- anything else (tools, tool calls, content parts): the counter's `bound` (renders the chat);
- when even the bound does not fit some route: the counter's exact `count`.

Without a counter (`gateway cheapest`, tests): the same formula with `DEFAULT_ALLOWANCE`, large
enough for the shipped formats' templates; tool JSON is counted by its bytes, an estimate.
The estimate for prices is bytes / 4 (a typical English ratio) plus the same per-message part.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.catalog import Model

BYTES_PER_TOKEN_ESTIMATE = 4
PER_MESSAGE_BOUND = 24  # role tag + EOS + dummy prefix + join, with room (see above)
DEFAULT_ALLOWANCE = 192  # BOS + WizardLM-2's 153-byte default system prompt + tags
MINIMAL_CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": ""}]}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _nbytes(text: str) -> int:
    """UTF-8 bytes of the text, never raising. A lone surrogate ("\\ud800" in the JSON) is
    not valid UTF-8; "surrogatepass" counts it as 3 bytes, what U+FFFD (its usual replacement
    downstream, and ours: `without_surrogates`) takes, so the bound stays an upper bound."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _has_surrogates(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def without_surrogates(value: Any) -> Any:
    """A copy of a JSON value with every lone surrogate replaced by U+FFFD: what the tokenizer
    is given (it cannot encode them), counted as `_nbytes` counts them."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [without_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_surrogates(k): without_surrogates(v) for k, v in value.items()}
    return value


@dataclass(slots=True)
class PromptText:
    """What one walk of the body learned."""

    nbytes: int = 0  # UTF-8 bytes of every text the prompt carries
    messages: int = 0
    texts: int = 0  # completions: prompts given as text (each gets BOS + a dummy prefix)
    token_ids: int = 0  # completions: prompts given as token ids, counted exactly already
    plain: bool = True  # chat: string contents only, no tools / tool calls / parts
    completions: bool = False
    surrogates: bool = False  # some text holds a lone surrogate: count `without_surrogates`

    @classmethod
    def of(cls, body: dict[str, Any], endpoint: str) -> PromptText:
        out = cls()
        if endpoint == "completions":
            out.completions = True
            out._add_prompt(body.get("prompt"))
            return out
        messages = body.get("messages")
        if isinstance(messages, list):
            out.messages = len(messages)
            for message in messages:
                if isinstance(message, dict):
                    out._add_message(message)
                else:
                    out.plain = False
        tools = body.get("tools")
        if tools:
            out.plain = False
            out._add_text(json.dumps(tools, ensure_ascii=False))
        return out

    def _add_text(self, text: str) -> None:
        if text.isascii():
            self.nbytes += len(text)
            return
        self.nbytes += _nbytes(text)
        self.surrogates = self.surrogates or _has_surrogates(text)

    def _add_message(self, message: dict[str, Any]) -> None:
        content = message.get("content")
        if isinstance(content, str):
            self._add_text(content)
            if len(message) <= 2:  # {"role", "content"}: the common case, nothing else to read
                return
        elif content is not None:
            self.plain = False
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        self._add_text(part["text"])
        for key in ("name", "tool_call_id"):
            value = message.get(key)
            if isinstance(value, str):
                self.plain = False
                self._add_text(value)
        calls = message.get("tool_calls")
        if calls:
            self.plain = False
            self._add_text(json.dumps(calls, ensure_ascii=False))

    def _add_prompt(self, prompt: object) -> None:
        if isinstance(prompt, str):
            self._add_text(prompt)
            self.texts += 1
        elif isinstance(prompt, list):
            if prompt and all(isinstance(t, int) for t in prompt):
                self.token_ids += len(prompt)
                return
            for item in prompt:
                if isinstance(item, str):
                    self._add_text(item)
                    self.texts += 1
                elif isinstance(item, list):
                    self.token_ids += sum(1 for t in item if isinstance(t, int))

    @property
    def exact(self) -> bool:
        """A prompt made only of token ids needs no tokenizer."""
        return self.completions and self.texts == 0 and self.token_ids > 0

    def bound(self, allowance: int = DEFAULT_ALLOWANCE) -> int:
        """Upper bound with the model's template allowance (see the module doc)."""
        if self.completions:  # BOS + dummy prefix + bytes per text prompt; ids as they are
            return self.nbytes + 2 * self.texts + self.token_ids
        return self.nbytes + PER_MESSAGE_BOUND * self.messages + allowance

    @property
    def estimate(self) -> int:
        text = -(-self.nbytes // BYTES_PER_TOKEN_ESTIMATE)
        if self.completions:
            return text + self.texts + self.token_ids
        return text + PER_MESSAGE_BOUND * self.messages + DEFAULT_ALLOWANCE // 4


class PromptCounterLike(Protocol):
    """What the router needs from `gateway.routing.tokens.PromptCounter`."""

    def count(self, model: Model, body: dict[str, Any], endpoint: str) -> int: ...

    def bound(self, model: Model, body: dict[str, Any], endpoint: str) -> int: ...
