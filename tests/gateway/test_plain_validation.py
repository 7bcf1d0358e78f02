"""The validator's fast path never accepts what the pydantic schemas refuse."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.api.schemas import _SCHEMAS, INT32_MAX, _plainly_valid, validate_request
from gateway.errors import InvalidRequest

ODD: list[Any] = [
    None, True, False, 0, 1, -1, INT32_MAX, INT32_MAX + 1, 1.0, 1.5, "", "x", "user",
    [], [{}], [1], {}, {"include_usage": 1}, {"include_usage": True}, {"x": 1},
    [{"role": "user", "content": "hi"}], [{"role": "user", "content": ["hi"]}],
    [{"role": "user", "content": None, "name": 3}], [{"role": ["user"]}],
    [{"role": "robot", "content": "hi"}], [{"role": "tool", "content": "hi", "extra": 1}],
]  # fmt: skip
FIELDS = ["model", "messages", "prompt", "stream", "max_tokens", "user", "stream_options", "n"]
BASE = {
    "chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "completions": {"model": "m", "prompt": "hi"},
}


def pydantic_accepts(body: dict[str, Any], endpoint: str) -> bool:
    try:
        _SCHEMAS[endpoint].model_validate(body)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_fast_acceptance_implies_pydantic_acceptance(endpoint: str) -> None:
    fast = 0
    for field, value in itertools.product(FIELDS, ODD):
        for body in ({**BASE[endpoint], field: value}, {field: value}):
            if _plainly_valid(body, endpoint):
                fast += 1
                assert pydantic_accepts(body, endpoint), body
    assert fast > 10  # the fast path is really taken for plain bodies


def test_plain_requests_take_the_fast_path_and_odd_ones_still_get_the_400() -> None:
    plain = {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert _plainly_valid(plain, "chat")
    assert not _plainly_valid({**plain, "temperature": 0.5}, "chat")  # pydantic decides
    validate_request({**plain, "temperature": 0.5}, "chat")
    with pytest.raises(InvalidRequest, match="temperature"):
        validate_request({**plain, "temperature": "hot"}, "chat")
    with pytest.raises(InvalidRequest, match="stream_options"):
        validate_request({**plain, "stream_options": {"include_usage": 1}}, "chat")
    with pytest.raises(InvalidRequest, match="max_tokens"):
        validate_request({**plain, "max_tokens": True}, "chat")
