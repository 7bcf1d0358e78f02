"""Hostile inputs get a 400 naming the field, never a 500: huge integers, NaN, lone
surrogates, giant admin cookies, and validation errors that name the field the client sent."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest

from gateway.api.admin import COOKIE, session_cookie
from gateway.api.schemas import INT32_MAX, _where, validate_request
from gateway.errors import ContextLengthExceeded, InvalidRequest
from gateway.prices import PriceBook
from gateway.routing import Router, request_cost
from gateway.routing.prompt import PromptText, without_surrogates
from gateway.routing.tokens import PromptCounter
from tests.gateway.routing_fixtures import (
    LEPTON,
    WIZARD,
    chat,
    hermetic_settings,
    make_router,
    real_catalog,
    running_app,
)

HUGE = 10**400  # a JSON integer no float can hold
TOKEN = "admin-token-0123456789"


def _short(value: object) -> str:
    return str(value)[:16]  # test ids: not 400 digits


def _param(body: dict[str, Any], endpoint: str = "chat") -> str | None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request(body, endpoint)
    return caught.value.param


# -- schemas: bounded integers, finite floats ---------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", HUGE),
        ("max_tokens", INT32_MAX + 1),
        ("max_completion_tokens", 10**30),
        ("seed", 2**70),
        ("n", HUGE),
        ("top_logprobs", HUGE),
        ("temperature", math.nan),
        ("top_p", math.inf),
        ("presence_penalty", math.nan),
        ("logit_bias", {"1": math.nan}),
    ],
    ids=_short,
)
def test_out_of_range_numbers_are_a_400_naming_the_field(field: str, value: object) -> None:
    param = _param({**chat(), field: value})
    assert param is not None and param.split(".")[0] == field


def test_the_largest_allowed_budget_and_seed_pass() -> None:
    validate_request(chat(max_tokens=INT32_MAX, seed=2**63 - 1), "chat")
    validate_request(chat(max_completion_tokens=INT32_MAX, seed=-(2**63)), "chat")


@pytest.mark.parametrize("prompt", [[HUGE], [-1], [[1, 2**40]]], ids=_short)
def test_completion_token_ids_are_bounded(prompt: object) -> None:
    assert _param({"model": WIZARD, "prompt": prompt}, "completions") == "prompt"


# -- validation errors name the field the client sent ------------------------------------------


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": "x"}}]},
            "tools[0].function.strict",
        ),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop"),  # a union: its branch tags are dropped
        ({"tool_choice": {"type": "x", "function": {}}}, "tool_choice"),  # first: the literal
        ({"logit_bias": {"str": "x"}}, "logit_bias.str"),  # a key that looks like a tag stays
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [5]}]}, "messages[0].content"),
        ({"integer_thing": 1, "n": "2"}, "n"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
def test_validation_errors_name_the_real_field(extra: dict[str, Any], where: str) -> None:
    assert _param({**chat(), **extra}) == where


def test_only_union_tags_right_after_their_field_are_dropped() -> None:
    assert _where(("tool_choice", "NamedToolChoice", "type")) == "tool_choice.type"
    assert _where(("prompt", "list[list[constrained-int]]", 0, 1)) == "prompt[0][1]"
    assert _where(("logit_bias", "str")) == "logit_bias.str"
    assert _where(("stream",)) == "stream" and _where(("integer_thing",)) == "integer_thing"


# -- the router never raises on what validation let through (or what it never saw) -------------


def test_router_refuses_a_huge_budget_as_the_clients_error() -> None:
    router = make_router(real_catalog())
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(InvalidRequest) as caught:
            router.plan({**chat(), field: HUGE})
        assert caught.value.param == field


def test_rank_with_a_huge_budget_reports_fit_errors_not_overflow() -> None:
    ranked = make_router(real_catalog()).rank(WIZARD, prompt_tokens=100, max_tokens=HUGE)
    assert ranked and all(not r.fits for r in ranked)
    assert all(math.isfinite(r.cost) for r in ranked)


def test_request_cost_caps_counts_instead_of_overflowing() -> None:
    assert request_cost(10**6, 10**6, 0.5, 1.5) == pytest.approx(2.0)
    assert math.isfinite(request_cost(HUGE, HUGE, 1.0, 1.0))


@pytest.mark.parametrize("cap", [math.nan, -1, "1", True])
def test_a_bad_max_price_is_a_400(cap: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        make_router(real_catalog()).plan(chat(provider={"max_price": {"prompt": cap}}))
    assert caught.value.param == "provider.max_price.prompt"


def test_a_max_price_beyond_floats_is_no_cap() -> None:
    plan = make_router(real_catalog()).plan(chat(provider={"max_price": {"prompt": HUGE}}))
    assert plan.candidates


@functools.cache
def counter() -> PromptCounter:
    return PromptCounter()


@functools.cache
def counted_router() -> Router:
    return make_router(real_catalog(), counter=counter())


LONE = "\ud800"
SURROGATE_BODIES = [
    chat(LONE),
    chat(f"a{LONE}b\udfff"),
    {"model": WIZARD, "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
    {
        "model": WIZARD,
        "messages": [{"role": "user", "content": LONE, "name": f"n{LONE}"}],
        "tools": [{"type": "function", "function": {"name": f"f{LONE}"}}],
    },
    {
        "model": WIZARD,
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"arguments": LONE}}]},
        ],
    },
]


def test_prompt_text_counts_a_lone_surrogate_as_its_replacement() -> None:
    text = PromptText.of(chat(f"a{LONE}b"), "chat")
    assert text.surrogates and text.nbytes == 2 + len("\ufffd".encode())
    assert not PromptText.of(chat("a\u00e9b"), "chat").surrogates
    assert without_surrogates({"k": [f"a{LONE}"], LONE: 1}) == {"k": ["a\ufffd"], "\ufffd": 1}


@pytest.mark.parametrize("body", SURROGATE_BODIES)
async def test_router_plans_bodies_with_lone_surrogates(body: dict[str, Any]) -> None:
    router = counted_router()
    model = real_catalog().models[WIZARD]
    served = without_surrogates(body)  # what the tokenizer is given
    bound = router.prompt_bound(model, PromptText.of(body, "chat"), served, "chat")
    assert bound >= counter().count(model, served, "chat")  # still an upper bound
    for plan in (router.plan(body), await router.aplan(body)):
        assert plan.candidates


async def test_a_huge_surrogate_prompt_is_counted_exactly_off_the_loop() -> None:
    body = chat(LONE * 70_000)  # over every route's context: the exact count decides
    with pytest.raises(ContextLengthExceeded):
        await counted_router().aplan(body)
    completions = {"model": WIZARD, "prompt": LONE * 900}
    assert (await counted_router().aplan(completions, "completions")).candidates


# -- over HTTP: the API's answers -----------------------------------------------------------------


async def test_http_huge_max_tokens_is_a_400_naming_it() -> None:
    async with running_app(hermetic_settings()) as (_, client):
        body = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":1%s}' % (
            WIZARD.encode(),
            b"0" * 400,
        )
        response = await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize(
    "expiry", ["9" * 5000, "9" * 13, "\u00b2\u00b2", "+99999999999", ""], ids=_short
)
async def test_a_malformed_session_cookie_is_401_not_500(expiry: str) -> None:
    async with running_app(hermetic_settings(gateway_admin_token=TOKEN)) as (_, client):
        # latin-1: how the server decodes a header, so "²" arrives as a (non-ASCII) digit
        cookie = f"{COOKIE}={expiry}.abc".encode("latin-1")
        response = await client.get("/admin/api/dashboard", headers=[(b"cookie", cookie)])
        assert response.status_code == 401
        good = await client.get(
            "/admin/api/dashboard", headers={"cookie": f"{COOKIE}={session_cookie(TOKEN)}"}
        )
        assert good.status_code == 200


async def test_admin_price_api_rejects_a_price_beyond_floats() -> None:
    async with running_app(hermetic_settings(gateway_admin_token=TOKEN)) as (_, client):
        body = b'{"route_id":"%s","input":1%s,"output":1}' % (LEPTON.encode(), b"0" * 400)
        response = await client.post(
            "/admin/api/prices",
            content=body,
            headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "input"


@pytest.mark.parametrize("price", [HUGE, -HUGE, math.nan, math.inf, -math.inf, -0.5], ids=_short)
async def test_price_book_rejects_non_finite_huge_and_negative_prices(price: float) -> None:
    book = PriceBook(real_catalog())
    with pytest.raises(InvalidRequest) as caught:
        await book.set(LEPTON, price, 1.0)
    assert caught.value.param == "input"
    assert LEPTON not in book.overrides()
