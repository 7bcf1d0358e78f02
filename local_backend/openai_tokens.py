"""Token-level pieces of the OpenAI layer: prompts to ids, tool calls and logprobs back to JSON.

prompts = PromptEncoder(tokenizer, "wizardlm-2-8x22b")   # or a format: vicuna | mistral_v3
prompts.chat(messages, tools) -> ids     # chat_format.ChatEncoder (BOS included)
prompts.completion("text" | [ids]) -> ids   # a string gets BOS, a token list is taken as is
prompts.tool_message(generated_ids) -> assistant message with tool_calls | None (v3)
chat_logprobs / completion_logprobs: TokenLogprob lists in OpenAI's two shapes
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from local_backend.chat_format import ChatEncoder, ChatFormatError
from local_backend.generation import InvalidRequest
from local_backend.sampling import TokenLogprob
from local_backend.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TOOL_CALLS_ID = (
    5  # [TOOL_CALLS] in the v3 vocabulary (local_backend.formats.prompt_format.TOOL_CALLS)
)


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, model_or_format: str) -> None:
        self.tokenizer = tokenizer
        self.chat_encoder: ChatEncoder | None = None
        self.chat_unavailable = ""
        try:
            self.chat_encoder = ChatEncoder(tokenizer, model_or_format)
        except ValueError as exc:
            # Completions still work; chat requests get this reason as a 400.
            self.chat_unavailable = f"chat is not available on this server: {exc}"
            log.warning("%s (pass --chat-format vicuna|mistral_v3)", self.chat_unavailable)

    @property
    def format(self) -> str | None:
        return self.chat_encoder.format if self.chat_encoder else None

    def chat(self, messages: Sequence[Any], tools: Sequence[Any] | None) -> list[int]:
        if self.chat_encoder is None:
            raise InvalidRequest(self.chat_unavailable, "messages")
        try:
            return self.chat_encoder.encode(messages, tools or None)
        except ChatFormatError as exc:
            raise InvalidRequest(str(exc), "messages") from None

    def completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True)
        return list(prompt)

    def tool_message(self, generated: Sequence[int]) -> dict[str, Any] | None:
        """The assistant message of a v3 answer that wrote [TOOL_CALLS] and a readable list of
        calls (content = the text before it, or None); None for a plain-text answer."""
        if self.chat_encoder is None or TOOL_CALLS_ID not in generated:
            return None
        ids = [t for t in generated if t != self.tokenizer.eos_id]
        message = self.chat_encoder.parse_output(ids)
        return message if message.get("tool_calls") else None

    def uses_tool_calls(self) -> bool:
        return self.format == "mistral_v3"


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """(the token as OpenAI shows it, its UTF-8 bytes); a partial character shows as bytes."""
    data = tokenizer.token_bytes(token_id)
    try:
        return data.decode("utf-8"), list(data)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data), list(data)


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` of a chat completion."""
    content = []
    for lp in logprobs:
        text, data = token_text(tokenizer, lp.token_id)
        top = []
        for token_id, value in lp.top:
            top_text, top_bytes = token_text(tokenizer, token_id)
            top.append({"token": top_text, "logprob": value, "bytes": top_bytes})
        content.append({"token": text, "logprob": lp.logprob, "bytes": data, "top_logprobs": top})
    return content


def completion_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`choices[i].logprobs` of a legacy completion (text_offset relative to this text)."""
    tokens, values, tops, offsets = [], [], [], []
    offset = 0
    for lp in logprobs:
        text, _ = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({token_text(tokenizer, t)[0]: v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
