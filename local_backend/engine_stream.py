"""One request's stream, from the engine's thread to its consumer's event loop.

    RequestState      the engine's side of a request (its consumer's queue and loop)
    GenerationStream  the consumer's side: async iterator of ChoiceDelta, then `usage`
    deliver_batched   a step's items to every consumer, one wake-up per event loop

A consumer that goes away (stream.cancel(), leaving an `async with`, or dropping the stream)
asks the engine to cancel its request (`Cancels`, the engine as a stream sees it).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

from local_backend.generation import ChoiceDelta, EngineError, GenerationRequest, Usage


class Cancels(Protocol):
    def _cancel(self, state: RequestState) -> None: ...


StreamItem = ChoiceDelta | Usage | EngineError


class RequestState:
    """The engine's side of one request (the scheduler's `owner` of its n sequences).

    It holds the consumer's queue, not the stream itself, so a consumer that drops its stream
    lets it be garbage collected (and cancelled) while the engine still runs the request.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.wakeup: asyncio.Queue[list[StreamItem]] = asyncio.Queue()
        self.cancelled = False
        self.unfinished = request.n
        self.completion_tokens = 0
        self.submitted_at = time.perf_counter()
        self.last_token_at: float | None = None  # for TTFT, then the gaps between tokens

    def deliver(self, items: list[StreamItem]) -> bool:
        """Called from the engine thread; False when the consumer's loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.wakeup.put_nowait, items)
        except RuntimeError:  # event loop closed
            return False
        return True


def _put_all(deliveries: list[tuple[RequestState, list[StreamItem]]]) -> None:
    """On the consumers' loop: hand each request its step's items."""
    for state, items in deliveries:
        state.wakeup.put_nowait(items)


def deliver_batched(deliveries: list[tuple[RequestState, list[StreamItem]]]) -> None:
    """One wake-up per event loop per step (not one per request: at batch 32 that was 32
    self-pipe writes and 32 loop callbacks each step); a closed loop cancels its requests."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestState, list[StreamItem]]]] = {}
    for state, items in deliveries:
        by_loop.setdefault(state.loop, []).append((state, items))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # event loop closed: its consumers are gone
            for state, _ in batch:
                state.cancelled = True


class GenerationStream:
    """Async iterator of ChoiceDelta for one request; `usage` is set when it ends."""

    def __init__(self, engine: Cancels, request: GenerationRequest) -> None:
        self._engine = engine
        self._state = RequestState(request)
        self._buffer: deque[StreamItem] = deque()
        self.request_id = request.request_id
        self.prompt_tokens = len(request.prompt_tokens)
        self.usage: Usage | None = None
        self.finished = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> ChoiceDelta:
        while not self._buffer:
            if self.finished:
                raise StopAsyncIteration
            self._buffer.extend(await self._state.wakeup.get())
        item = self._buffer.popleft()
        if isinstance(item, ChoiceDelta):
            return item
        self.finished = True
        if isinstance(item, Usage):
            self.usage = item
            raise StopAsyncIteration
        raise item

    def cancel(self) -> None:
        """Stop generating for this request; its slots are freed at the next step."""
        if not self.finished:
            self.finished = True
            self._engine._cancel(self._state)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # A consumer that drops the stream without finishing it has gone away.
        if not getattr(self, "finished", True):
            self.finished = True
            self._engine._cancel(self._state)
