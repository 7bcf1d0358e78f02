"""The stream's role chunk: the first delta says `role: assistant`, as OpenAI sends it.

Clients (the openai SDK's stream helpers, LangChain, many UIs) read the speaker from the first
delta. The gateway relays the upstream's own role chunk (also through the `</s>` stripper,
which used to drop it for having no text) and synthesises one when an upstream sends none.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, Gateway

HI: Any = [{"role": "user", "content": "Say hello to the tests"}]


def _stream(gateway: Gateway, provider: str, **extra: Any) -> list[Any]:
    return list(
        gateway.openai().chat.completions.create(
            model=MODEL,
            messages=HI,
            stream=True,
            extra_body={"provider": {"only": [provider]}},
            **extra,
        )
    )


@pytest.mark.parametrize("provider", ["lepton", "novita", "openrouter", "deepinfra"])
def test_first_chunk_carries_the_assistant_role_with_empty_content(
    gateway: Gateway, upstreams: FakeUpstreams, provider: str
) -> None:
    chunks = _stream(gateway, provider)
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert first.choices[0].finish_reason is None
    assert first.model_extra is not None and first.model_extra["provider"] == provider
    # Exactly one role chunk, and the text is unchanged by it.
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"Hello from {provider}!"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_role_chunk_is_synthesised_when_the_upstream_sends_none(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["lepton"].inject(Fault("no_role_chunk"))
    chunks = _stream(gateway, "lepton", stream_options={"include_usage": True})
    first, second = chunks[0], chunks[1]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    # It belongs to the same completion as the upstream's chunks.
    assert first.id == second.id and first.created == second.created
    assert first.model == second.model == MODEL
    assert second.choices[0].delta.role is None and second.choices[0].delta.content
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from lepton!"
    # The synthesised chunk is no output: usage counts what the upstream produced.
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_deepinfra_sample_keeps_its_roles_and_strips_the_eos(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    chunks = list(
        gateway.openai().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello!"}],
            stream=True,
            extra_body={"provider": {"only": ["deepinfra"]}},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "  Hi!"


def test_completions_stream_gets_no_role(gateway: Gateway, upstreams: FakeUpstreams) -> None:
    chunks = list(
        gateway.openai().completions.create(
            model=MODEL,
            prompt="Say hello",
            stream=True,
            extra_body={"provider": {"only": ["lepton"]}},
        )
    )
    assert chunks and all("role" not in (c.choices[0].model_extra or {}) for c in chunks)
    # a synthesised role chunk would carry a `delta` (and no text): completions have neither
    assert all("delta" not in (c.choices[0].model_extra or {}) for c in chunks)
    assert all(isinstance(c.choices[0].text, str) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == "Hello from lepton!"


def _raw_events(gateway: Gateway, provider: str) -> list[str]:
    body = {"model": MODEL, "messages": HI, "stream": True, "provider": {"only": [provider]}}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        response = client.post("/v1/chat/completions", json=body)
    return [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]


def test_chunks_already_right_are_relayed_as_the_upstream_sent_them(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    # Lepton's slug is our model id: its chunks (json.dumps with ", " and ": ") go out as sent,
    # with the provider appended; Novita's slug differs: those are re-encoded with our id.
    lepton, novita = _raw_events(gateway, "lepton"), _raw_events(gateway, "novita")
    for events, relayed in ((lepton, True), (novita, False)):
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(json.loads(c)["model"] == MODEL for c in chunks)
        assert all(json.loads(c)["provider"] in ("lepton", "novita") for c in chunks)
        # (the first content chunk was read while the attempt opened: it is re-encoded)
        content = [c for c in chunks if '"content"' in c and "role" not in c][1:]
        assert len(content) == 3
        assert all(('"choices": [' in c) == relayed for c in content), content
        if relayed:
            assert all(
                c.endswith(', "finish_reason": null}],"provider":"lepton"}') for c in content
            )


def test_chunks_are_not_held_back_while_the_upstream_is_still_generating(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    """Chunks received together leave together; one never waits for the next network read."""
    upstreams["lepton"].tokens = ["a", "b", "c"]
    upstreams["lepton"].chunk_delay_s = 0.25  # before each content chunk
    body = {"model": MODEL, "messages": HI, "stream": True, "provider": {"only": ["lepton"]}}
    arrivals: list[tuple[float, str]] = []
    with (
        httpx.Client(base_url=gateway.url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                text = choices[0]["delta"].get("content") if choices else None
                if text:
                    arrivals.append((time.monotonic(), text))
    assert [text for _, text in arrivals] == ["a", "b", "c"]
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(arrivals)]
    assert all(gap >= 0.15 for gap in gaps), gaps  # each left when it came, ~0.25 s apart
