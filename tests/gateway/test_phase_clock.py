"""PhaseClock (providers/phase_clock.py): per-phase limits, the total, one timer per attempt."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from gateway.dispatch import RequestContext
from gateway.errors import UpstreamTimeout
from providers.base import PhaseTimeouts
from providers.phase_clock import PhaseClock


async def test_a_wait_longer_than_its_phase_is_blamed_on_the_phase() -> None:
    clock = PhaseClock("test/route", total=10)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await clock.wait(asyncio.sleep(5), "gap", 0.1)
    assert caught.value.phase == "gap"
    assert 0.08 <= time.monotonic() - started < 1.0


async def test_the_total_cuts_a_phase_and_takes_the_blame() -> None:
    clock = PhaseClock("test/route", total=0.15)
    assert await clock.wait(asyncio.sleep(0.05, "first"), "first_token", 1) == "first"
    with pytest.raises(UpstreamTimeout) as caught:
        await clock.wait(asyncio.sleep(5), "gap", 1)  # gap allows 1 s, the total ~0.1 s
    assert caught.value.phase == "total"


async def test_a_later_deadline_is_honoured_after_an_earlier_one() -> None:
    # The first wait sets the timer for 0.1 s; the second may take 0.3 s: when the timer fires
    # early it must wait on, not cut the second short.
    clock = PhaseClock("test/route", total=10)
    assert await clock.wait(asyncio.sleep(0.01, 1), "first_token", 0.1) == 1
    assert await clock.wait(asyncio.sleep(0.3, 2), "gap", 0.6) == 2


async def test_an_earlier_deadline_is_honoured_after_a_later_one() -> None:
    clock = PhaseClock("test/route", total=10)
    assert await clock.wait(asyncio.sleep(0.01, 1), "first_token", 5) == 1
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await clock.wait(asyncio.sleep(5), "gap", 0.1)
    assert caught.value.phase == "gap" and time.monotonic() - started < 1.0


async def test_since_counts_the_phase_from_an_earlier_moment() -> None:
    clock = PhaseClock("test/route", total=10)
    headers_at = clock.now()
    await asyncio.sleep(0.1)
    with pytest.raises(UpstreamTimeout) as caught:  # 0.15 s from headers_at: 0.05 s left
        await clock.wait(asyncio.sleep(0.5), "first_token", 0.15, since=headers_at)
    assert caught.value.phase == "first_token"


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    clock = PhaseClock("test/route", total=10)
    waiting = asyncio.create_task(clock.wait(asyncio.sleep(5), "gap", 1))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_stop_ends_the_attempt_but_a_later_wait_is_still_timed() -> None:
    clock = PhaseClock("test/route", total=10)
    await clock.wait(asyncio.sleep(0), "headers", 5)
    clock.stop()
    clock.stop()  # idempotent
    await asyncio.sleep(0.05)  # no timer of this clock cancels anything between waits
    with pytest.raises(UpstreamTimeout):
        await clock.wait(asyncio.sleep(5), "gap", 0.05)


def test_an_attempt_gets_what_is_left_of_the_deadline_and_keeps_its_other_phases() -> None:
    base = PhaseTimeouts(connect=1.5, headers=2.5, first_token=3.5, gap=4.5, total=600.0)
    ctx = RequestContext(endpoint="chat", client_key="k", started=time.perf_counter())
    ctx.arm(300.0)
    cut = ctx.attempt_timeouts(base)
    assert 299.0 < cut.total <= 300.0
    # every other field as the base has it, whatever fields PhaseTimeouts grows
    assert {**dataclasses.asdict(cut), "total": base.total} == dataclasses.asdict(base)
    assert ctx.attempt_timeouts(PhaseTimeouts(total=100.0)) == PhaseTimeouts(total=100.0)
