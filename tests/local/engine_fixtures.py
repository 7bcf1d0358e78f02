"""Fixtures and helpers for the engine, OpenAI-layer and server tests (tiny model, CPU).

Import the fixtures into a test module under their function names (pytest registers them by
`name=`, so the test arguments do not shadow an import):
`from .engine_fixtures import engine_fixture, make_engine_fixture, tokenizer_fixture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from local_backend.engine import Engine
from local_backend.generation import GenerationRequest
from local_backend.sampling import SamplingParams
from local_backend.tokenizer import Tokenizer

MAX_SEQ_LEN = 256


@pytest.fixture(scope="session", name="tokenizer")
def tokenizer_fixture() -> Tokenizer:
    # the tiny checkpoint has no tokenizer files: WizardLM-2's v1 file from mistral-common
    return Tokenizer.from_mistral_common("v1")


@pytest.fixture(name="make_engine")
def make_engine_fixture(tiny_model: tuple[Any, Any], tokenizer: Tokenizer) -> Iterator[Any]:
    """make_engine(start=True, **engine kwargs) -> a started Engine, stopped after the test."""
    model, config = tiny_model
    made: list[Engine] = []

    def make(start: bool = True, **kwargs: Any) -> Engine:
        kwargs.setdefault("max_slots", 4)
        kwargs.setdefault("max_seq_len", MAX_SEQ_LEN)
        engine = Engine(model, tokenizer, config, **kwargs)
        made.append(engine)
        return engine.start() if start else engine

    yield make
    for engine in made:
        engine.stop()


@pytest.fixture(name="engine")
def engine_fixture(make_engine: Any) -> Engine:
    return make_engine()


def greedy(prompt: list[int], max_tokens: int = 12, **kwargs: Any) -> GenerationRequest:
    """A greedy request that ignores eos, so its length is exactly max_tokens."""
    kwargs.setdefault("ignore_eos", True)
    return GenerationRequest(
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0),
        **kwargs,
    )


PROMPTS = [
    [1, 415, 2936, 9060],
    [1, 22557, 28725, 910, 460, 368, 28804, 315, 837, 1179, 28723, 13, 1014],
    [1, *range(1000, 1030)],
]
