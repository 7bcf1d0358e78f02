"""The stream guard: serves one upstream stream to the client and never fakes success.

    guard = await dispatcher.open_stream(plan, body, ctx)   # first output already in hand
    async for event in guard.events(): send(event)           # SSE bytes
    await guard.aclose()                                      # always: hangs up, records once

Every chunk the client sees carries the serving `provider` and our model id; upstream usage is
taken out of the chunks (the gateway always asked for it) and, when the client set
`stream_options.include_usage`, comes back as one final `choices: []` chunk with `usage.cost`.

When the upstream fails after the first output reached the client, the stream ends with an
explicit error event (errors.StreamInterrupted, OpenAI's error shape) and no `[DONE]` — unless
the answer can be continued exactly on another candidate route serving the same weights. That
is the case for `/v1/completions` with one plain-string prompt (n=1, no echo/logprobs/best_of/
suffix): the prompt is raw text, so re-asking with prompt + the text already served continues
the same answer; `max_tokens` shrinks by what was served and stop sequences that straddle the
seam are caught here. Chat is never continued: a trailing assistant message is read as a
finished turn by some of our upstreams and as a prefix to extend by others, and nothing in their
APIs says which, so a "continued" chat answer could silently restart — we end with the error.

Accounting: each upstream segment records exactly one attempt and one usage (what that upstream
served; counted with the tokenizer when it reported none, e.g. after a cut). A normal stream has
one segment; a continued one has two or more, and the client's usage sums them (prompt tokens
as the client sent them). A client that hangs up closes the upstream call; what was served up
to then is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from gateway.accounting import ServedText, Settled, client_usage, output_text, reported_counts
from gateway.dispatch.chunks import chunk_object, dumps, has_role, provider_tail, role_event
from gateway.dispatch.context import (
    AttemptRunner,
    OpenedStream,
    RequestContext,
    quietly_close,
)
from gateway.errors import GatewayError, StreamInterrupted, UpstreamError, stream_error_event
from gateway.routing import RoutePlan

log = logging.getLogger(__name__)


_DONE = b"data: [DONE]\n\n"
_NOT_CONTINUABLE = ("echo", "logprobs", "suffix")
_MAX_CONTINUED_CHARS = 1 << 20  # ~256K tokens: beyond any route's context anyway


class StreamGuard:
    def __init__(
        self,
        dispatcher: AttemptRunner,
        plan: RoutePlan,
        body: dict[str, Any],
        ctx: RequestContext,
        opened: OpenedStream,
    ):
        self._d = dispatcher
        self._plan = plan
        self._body = body
        self._ctx = ctx
        self._seg = opened
        self._seg_open = True
        self._seg_recorded = False  # the segment's attempt is written (usage may still wait)
        self._seg_usage: dict[str, Any] | None = None
        # what this segment served, as much as counting needs (a sample and its length)
        self._seg_text = ServedText(dispatcher.accountant.max_count_chars)
        self._text: dict[int, list[str]] = {}  # everything served, per choice (to continue)
        # The text served so far, kept only while the answer could be continued elsewhere and
        # is not too long to re-send as a prompt (a hostile upstream must not fill memory).
        self._keep_text = self.continuable()
        self._kept_chars = 0
        self._choices: set[int] = set()  # every choice index the client has seen
        self._finished: set[int] = set()
        self._settled: list[Settled] = []
        self._id: Any = None
        self._created: Any = None
        self._object: Any = None
        self._segments = 0
        self._stops: tuple[str, ...] = ()
        self._stopped = False
        self._closed = False
        self._failed: UpstreamError | None = None  # the error that ended the answer
        self.route = opened.route
        self.attempts = len(ctx.trail) + 1

    # -- serving ------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[bytes]:
        seg = self._seg
        while True:
            for first in seg.head:
                event = self._emit(first)
                if event:
                    yield event
            seg.head = []
            error = None
            held: list[bytes] = []  # events of chunks that arrived together: sent together
            if not self._stopped:
                stream = seg.stream
                try:  # (`async for`: no helper coroutine per chunk)
                    async for chunk in seg.chunks:
                        event = self._emit(chunk, getattr(stream, "raw", None))
                        if event:
                            held.append(event)
                        if self._stopped:
                            break
                        if held and not getattr(stream, "pending", False):
                            yield held[0] if len(held) == 1 else b"".join(held)
                            held = []
                except UpstreamError as exc:
                    error = exc
            if held:
                yield b"".join(held)
            if error is not None and not self._answer_complete() and not self._keep_text:
                # Not continuable (or served too much to re-send): the failed attempt is
                # recorded and the client told at once; counting what was served (it may take
                # a moment) waits for aclose(), after the response.
                await quietly_close(seg.stream)
                self._record_segment_attempt(error, self._seg_text.total_estimate())
                self._failed = error  # before the yield: a hang-up there still ends it failed
                yield self._interrupted(error)
                return
            await self._end_segment(error)
            if error is None or self._answer_complete():
                break
            follow = await self._continuation()
            if isinstance(follow, bytes):
                yield follow  # the budget was already spent: finish as "length"
                break
            if follow is None:
                yield self._interrupted(error)
                return
            seg = self._seg = follow
            self._seg_open = True
            self._seg_recorded = False
            self._seg_usage = None
            self._segments += 1
        for event in self._tail():
            yield event

    def _interrupted(self, error: UpstreamError) -> bytes:
        interrupted = StreamInterrupted(
            f"the upstream failed after the answer started ({error.kind}); "
            "the answer is incomplete",
            attempts=self._ctx.trail,
        )
        self._observe_failure(error.kind)
        return stream_error_event(interrupted)

    def _emit(self, chunk: dict[str, Any], raw: bytes | None = None) -> bytes | None:
        """The chunk as the client gets it: our model id and the serving provider in it. `raw`:
        the upstream's JSON bytes of it, relayed with `provider` appended when nothing else
        would change (the model id is ours already, no usage, no continuation)."""
        usage = chunk.pop("usage", None)
        if usage is not None and reported_counts(usage) is not None:
            self._seg_usage = usage
        choices = chunk.get("choices")
        if not choices:
            return None
        role = b""
        if self._id is None:
            self._id, self._created, self._object = (
                chunk.get("id"),
                chunk.get("created"),
                chunk.get("object"),
            )
            if self._ctx.endpoint == "chat" and not has_role(choices):
                role = self._role_event(chunk)
        elif self._segments:
            chunk["id"], chunk["created"] = self._id, self._created
        model_id, provider = self._seg.model.id, self._seg.route.provider
        relay = (
            raw is not None
            and usage is None
            and not self._segments
            and chunk.get("model") == model_id
            and "provider" not in chunk
        )
        chunk["model"] = model_id
        chunk["provider"] = provider
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            self._choices.add(index)
            delta = choice.get("delta")
            # where the choice keeps its text (sse.choice_text_key, inlined: once per chunk)
            holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
            text = holder.get(key)
            if isinstance(text, str):
                if self._segments and self._stops:
                    text = holder[key] = self._cut_at_stop(index, text, choice)
                if text:  # (an empty piece adds nothing to the served text)
                    self._seg_text.add(text)
                    if self._keep_text:
                        self._keep(index, text)
            if isinstance(delta, dict) and delta.get("tool_calls"):
                self._seg_text.add(output_text([delta]))
            if choice.get("finish_reason"):
                self._finished.add(index)
        if relay:
            assert raw is not None
            # an event of several data lines: JSON whitespace, made one line (replace() gives
            # the object itself back when there is nothing to replace)
            body = raw.rstrip().replace(b"\n", b" ")
            if body.endswith(b"}"):
                return role + b"data: " + body[:-1] + provider_tail(provider) + b"\n\n"
        return role + b"data: " + dumps(chunk) + b"\n\n"

    def _role_event(self, first: dict[str, Any]) -> bytes:
        """OpenAI's first chunk, for an upstream that sent none (chunks.role_event)."""
        head = {"id": self._id, "object": self._object, "created": self._created}
        return role_event(first, head, self._seg.model.id, self._seg.route.provider)

    def _tail(self) -> list[bytes]:
        out = []
        ctx = self._ctx
        if ctx.want_usage or ctx.debug:
            last: dict[str, Any] = {
                "id": self._id,
                "object": self._object or chunk_object(ctx.endpoint),
                "created": self._created if self._created is not None else int(time.time()),
                "model": self._seg.model.id,
                "provider": self._seg.route.provider,
                "choices": [],
            }
            if ctx.want_usage:
                last["usage"] = client_usage(self._seg_usage, self.total())
            if ctx.debug:
                last["attempts"] = ctx.trail
            out.append(b"data: " + dumps(last) + b"\n\n")
        out.append(_DONE)
        return out

    def total(self) -> Settled:
        """The client's usage: the first segment's prompt, every segment's completion."""
        first = self._settled[0]
        completion = sum(s.completion_tokens for s in self._settled)
        cost = sum(s.cost for s in self._settled)
        return Settled(first.prompt_tokens, completion, cost, any(s.counted for s in self._settled))

    def _answer_complete(self) -> bool:
        return bool(self._choices) and self._choices <= self._finished

    # -- segments: one attempt and one usage each ---------------------------------------------

    async def _end_segment(self, error: UpstreamError | None, *, cancelled: bool = False) -> None:
        if not self._seg_open:
            return
        self._seg_open = False
        seg = self._seg
        await quietly_close(seg.stream)
        text, self._seg_text = self._seg_text, ServedText(self._d.accountant.max_count_chars)
        acct = self._d.accountant
        args = (seg.route, seg.model, self._seg_usage, seg.body, self._ctx.endpoint, text)
        interrupted: asyncio.CancelledError | None = None
        try:
            prompt, completion, counted = await acct.acounts(*args)
        except asyncio.CancelledError as exc:  # usage is never dropped: count here, capped
            interrupted = exc
            prompt, completion, counted = acct.counts(*args)
        if not self._seg_recorded:
            self._record_segment_attempt(error, completion, cancelled=cancelled)
        # A continuation's prompt includes the answer's first part: this record keeps what the
        # upstream really processed; the client's usage (total()) keeps the prompt it sent.
        self._settled.append(
            acct.settle(
                seg.route,
                seg.model,
                self._ctx.client_key,
                prompt,
                completion,
                counted=counted,
                # a failed segment's usage is written at once, with its failed attempt
                after=self._ctx.after_response if error is None else None,
            )
        )
        if interrupted is not None:
            raise interrupted

    def _record_segment_attempt(
        self, error: UpstreamError | None, completion: int, *, cancelled: bool = False
    ) -> None:
        seg = self._seg
        self._seg_recorded = True
        self._d.record_attempt(
            seg.route,
            self._ctx,
            seg.started,
            error=error,
            ttft_s=seg.ttft_s,
            completion_tokens=completion,
            cancelled=cancelled,
        )

    async def aclose(self) -> None:
        """Always called once the response is over: a hang-up closes the upstream call."""
        if self._closed:
            return
        self._closed = True
        await self._end_segment(self._failed, cancelled=self._failed is None)

    # -- continuing on another route ----------------------------------------------------------

    def continuable(self) -> bool:
        body = self._body
        if self._ctx.endpoint != "completions" or not isinstance(body.get("prompt"), str):
            return False
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
            return False
        return not any(body.get(name) for name in _NOT_CONTINUABLE)

    def _keep(self, index: int, text: str) -> None:
        self._kept_chars += len(text)
        if self._kept_chars > _MAX_CONTINUED_CHARS:
            self._keep_text, self._text = False, {}  # too long to continue: stop keeping it
            return
        self._text.setdefault(index, []).append(text)

    async def _continuation(self) -> OpenedStream | bytes | None:
        if not self._keep_text:
            return None
        failed = {entry["route"] for entry in self._ctx.trail if not entry["ok"]}
        weights = self._seg.route.weights
        routes = [
            r
            for r in self._plan.candidates
            if r.weights == weights and r.id not in failed and r.provider in self._d.providers
        ]
        if not routes:
            return None
        served = "".join(self._text.get(0, []))
        body = dict(self._body)
        body["prompt"] = body["prompt"] + served
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int):
            left = max_tokens - sum(s.completion_tokens for s in self._settled)
            if left <= 0:
                return self._finish_chunk("length")
            body["max_tokens"] = left
        stop = body.get("stop")
        self._stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if s)
        try:
            opened = await self._d.reopen_stream(self._plan, body, self._ctx, routes)
        except GatewayError:
            return None
        return opened

    def _cut_at_stop(self, index: int, text: str, choice: dict[str, Any]) -> str:
        """Apply stop sequences across the seam: the upstream only scans its own new text."""
        longest = max(len(s) for s in self._stops)
        tail = "".join(self._text.get(index, []))[-(longest - 1) :] if longest > 1 else ""
        joined = tail + text
        cut = None
        for s in self._stops:
            at = joined.find(s)
            while at != -1 and at + len(s) <= len(tail):
                at = joined.find(s, at + 1)
            if at != -1 and (cut is None or at < cut):
                cut = at
        if cut is None:
            return text
        choice["finish_reason"] = "stop"
        self._stopped = True
        return text[: max(0, cut - len(tail))]

    def _finish_chunk(self, reason: str) -> bytes:
        chunk = {
            "id": self._id,
            "object": self._object or chunk_object(self._ctx.endpoint),
            "created": self._created,
            "model": self._seg.model.id,
            "provider": self._seg.route.provider,
            "choices": [{"index": 0, "text": "", "finish_reason": reason, "logprobs": None}],
        }
        self._finished.add(0)
        return b"data: " + dumps(chunk) + b"\n\n"

    def _observe_failure(self, kind: str) -> None:
        if self._d.metrics is not None:
            self._d.metrics.observe_failed_request(self._seg.model.id, kind, self._seg.route.id)
