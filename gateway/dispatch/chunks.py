"""Stream chunks the guard writes itself, and the bits of a relayed one: pure functions.

role_event(first, head, model, provider)   OpenAI's first chunk (`delta.role`) when an
                                           upstream sent none
provider_tail(provider)                    `,"provider":"<name>"}`: closes a relayed chunk
has_role(choices), chunk_object(endpoint), dumps(data)
"""

from __future__ import annotations

from typing import Any

from providers import json_codec

_TAILS: dict[str, bytes] = {}


def dumps(data: dict[str, Any]) -> bytes:
    return json_codec.dumps(data)


def provider_tail(provider: str) -> bytes:
    """`,"provider":"<name>"}`: what closes a relayed chunk (provider names: the catalog's)."""
    tail = _TAILS.get(provider)
    if tail is None:
        tail = _TAILS[provider] = b',"provider":' + json_codec.dumps(provider) + b"}"
    return tail


def has_role(choices: list[Any]) -> bool:
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("role"):
            return True
    return False


def chunk_object(endpoint: str) -> str:
    return "chat.completion.chunk" if endpoint == "chat" else "text_completion"


def role_event(first: dict[str, Any], head: dict[str, Any], model: str, provider: str) -> bytes:
    """Every choice's speaker, with empty content and no output (clients read `delta.role`
    from the first chunk). `head`: the stream's id, object and created."""
    indexes = sorted({c.get("index", 0) for c in first["choices"] if isinstance(c, dict)} or {0})
    chunk = {
        "id": head.get("id"),
        "object": head.get("object") or "chat.completion.chunk",
        "created": head.get("created"),
        "model": model,
        "provider": provider,
        "choices": [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in indexes
        ],
    }
    return b"data: " + dumps(chunk) + b"\n\n"
