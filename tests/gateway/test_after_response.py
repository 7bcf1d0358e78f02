"""The served answer's stats writes wait until its response is out (dispatch.py, openai_routes.py);
a failed attempt is written at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

from gateway.accounting import EstimateCounter
from gateway.api import openai_routes
from gateway.api.app import create_app
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, gateway_settings

LEPTON = "lepton/wizardlm-2-8x22b"
LEPTON_ONLY = {"provider": {"only": ["lepton"]}}


async def ask(upstreams: FakeUpstreams, body: dict[str, Any]) -> dict[str, Any]:
    """Serve one request through the app's handler; what the stats held at each moment."""
    app = create_app(gateway_settings(upstreams), counter=EstimateCounter())
    seen: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        stats = app.state.gw.stats
        raw = json.dumps(body).encode()
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [(b"content-length", b"%d" % len(raw))],
            "app": app,
        }
        messages: list[dict[str, Any]] = [{"type": "http.request", "body": raw}]
        done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif not message.get("more_body"):
                seen["usage_when_sent"] = await stats.usage(by="route")
                window = stats.route_health(LEPTON).windows["5m"]  # lazy: read it now
                seen["attempts_when_sent"] = (window.requests, window.failures)
                done.set()

        await openai_routes.handle(scope, receive, send, "chat")
        seen["usage_after_handler"] = await stats.usage(by="route")
        await asyncio.sleep(0)  # one turn of the loop: the queued writes run
        seen["usage_after"] = await stats.usage(by="route")
    return seen


async def test_the_answers_usage_is_written_once_right_after_its_response(
    upstreams: FakeUpstreams,
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **LEPTON_ONLY}
    seen = await ask(upstreams, body)
    assert seen["status"] == 200
    assert seen["usage_when_sent"] == {} and seen["usage_after_handler"] == {}
    after = seen["usage_after"]
    assert list(after) == [LEPTON] and after[LEPTON].requests == 1


async def test_a_failed_attempt_is_written_before_the_answer_leaves(
    upstreams: FakeUpstreams,
) -> None:
    upstreams["lepton"].inject(Fault("http_500"))  # one failure, then the retry serves
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **LEPTON_ONLY}
    seen = await ask(upstreams, body)
    assert seen["status"] == 200
    # (attempts, failures): the router could already see the failure, not yet the success
    assert seen["attempts_when_sent"] == (1, 1)
    assert seen["usage_after"][LEPTON].requests == 1
