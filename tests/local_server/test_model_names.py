"""The backend answers to its served name and its aliases (`serve --alias`, or the catalog's
ids in-process) without regard to case, so a client using any catalog name is not told its
model does not exist; any other name is still a 404."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local_backend.__main__ import build_parser
from local_backend.loader import load_service
from local_backend.openai_api import OpenAIService
from local_backend.server import create_app


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> Iterator[OpenAIService]:
    aliases = ("microsoft/WizardLM-2-8x22B", "wizardlm-2")
    service = load_service(
        tiny_checkpoint, device="cpu", max_slots=1, max_seq_len=64, aliases=aliases,
        progress=False,
    )  # fmt: skip
    yield service
    service.engine.stop()


async def test_served_name_and_aliases_answer_others_are_404(service: OpenAIService) -> None:
    transport = httpx.ASGITransport(app=create_app(service, stop_engine_on_shutdown=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        for name in ("wizardlm-2-8x22b", "microsoft/wizardlm-2-8x22b", "WizardLM-2"):
            body = {"model": name, "prompt": [1, 415], "max_tokens": 2}
            reply = await http.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == "wizardlm-2-8x22b"
        other = {"model": "gpt-4", "prompt": [1, 415], "max_tokens": 2}
        missing = await http.post("/v1/completions", json=other)
        assert missing.status_code == 404
        models = (await http.get("/v1/models")).json()["data"][0]
        assert models["aliases"] == ["microsoft/WizardLM-2-8x22B", "wizardlm-2"]
        assert (await http.get("/readyz")).json()["aliases"] == models["aliases"]


def test_serve_takes_repeated_aliases_and_the_stay_up_flag() -> None:
    args = build_parser().parse_args(
        ["serve", "--model-dir", "m", "--alias", "a", "--alias", "b", "--stay-up-on-load-failure"]
    )
    assert args.alias == ["a", "b"] and args.stay_up_on_load_failure is True
    assert build_parser().parse_args(["serve", "--model-dir", "m"]).stay_up_on_load_failure is False
