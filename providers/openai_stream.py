"""An upstream's open event stream, as OpenAI chunk dicts (see openai_compat.py).

    stream = OpenAIStream(route_id, response, clock, timeouts, strip_text, check_error)
    async for chunk in stream: ...      # phase timeouts enforced between network reads
        stream.raw                      # that chunk's JSON bytes as received (or None)
        stream.pending                  # another chunk already received follows it
    await stream.aclose()               # hangs up on the upstream

Until the first chunk with output, reads are limited by the first-token phase (counted from the
response headers); after it, by the gap between reads; always by the attempt's total (which the
gateway cuts to its request's deadline), also when bytes are already waiting: a stream that
trickles never outlives it. One event may not exceed `max_event_bytes` (the decoder refuses a
longer line before holding it), and our key, should the upstream echo it, is scrubbed from
each event before it is parsed. Leaked
end-of-sequence text is stripped (also across chunks), and a chunk left with nothing to say
(no text, tool call, role, finish_reason or usage) is dropped. A stream that ends without [DONE] is
complete only if every choice said how it finished; otherwise it was cut.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from providers import json_codec
from providers.base import PhaseTimeouts
from providers.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from providers.http1 import Http1Response, UpstreamLimitExceeded
from providers.phase_clock import NETWORK_ERRORS, PhaseClock
from providers.sse import (
    DEFAULT_MAX_EVENT_BYTES,
    EventTooLarge,
    SSEDecoder,
    TextStripper,
    choice_text_key,
    chunk_carries_output,
    normalize_usage,
)


class OpenAIStream:
    """An open upstream event stream: async-iterate OpenAI chunk dicts; `aclose()` hangs up."""

    def __init__(
        self,
        route_id: str,
        response: Http1Response,
        clock: PhaseClock,
        timeouts: PhaseTimeouts,
        strip_text: tuple[str, ...],
        check_error: Callable[[str, dict[str, Any]], None],
        *,
        secret: bytes = b"",
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ):
        self._secret = secret
        self._max_event = max_event_bytes
        self._route_id = route_id
        self._response = response
        self._clock = clock
        self._t = timeouts
        self._headers_at = clock.now()  # the first-token phase starts with the headers
        self._strip = strip_text
        self._check_error = check_error
        self._iterator: AsyncIterator[dict[str, Any]] | None = None
        # The JSON bytes of the chunk last yielded, exactly as the upstream sent them; None when
        # the chunk was changed on the way (leaked text stripped, usage normalized).
        self.raw: bytes | None = None
        # True while the chunk last yielded is followed by another already received: a caller
        # may hold its output and send both together.
        self.pending = False

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if self._iterator is None:
            self._iterator = self._chunks()
        return self._iterator

    async def aclose(self) -> None:
        self._clock.stop()
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            await iterator.aclose()  # type: ignore[attr-defined]
        await self._response.aclose()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        decoder = SSEDecoder(self._max_event)
        secret = self._secret
        stripper = TextStripper(self._strip) if self._strip else None
        started = False  # a chunk with output arrived: from now on only the gap limit applies
        finished: set[int] = set()
        choices_seen: set[int] = set()
        announced: set[int] = set()  # choices whose first chunk was kept (the role chunk)
        try:
            while True:
                data = await self._read(started)
                try:
                    payloads = decoder.feed(data) if data is not None else decoder.close()
                except EventTooLarge as exc:
                    raise UpstreamProtocolError(self._route_id, str(exc)) from None
                left = len(payloads)
                for payload in payloads:
                    left -= 1
                    if payload.strip() == b"[DONE]":
                        return
                    if secret and secret in payload:
                        payload = payload.replace(secret, b"[redacted]")
                    chunk = self._decode_chunk(payload)
                    for choice in chunk.get("choices") or ():
                        if isinstance(choice, dict):
                            index = choice.get("index", 0)
                            choices_seen.add(index)
                            if choice.get("finish_reason"):
                                finished.add(index)
                    if stripper is not None and not self._strip_chunk(stripper, chunk, announced):
                        continue
                    if not started and chunk_carries_output(chunk):
                        started = True
                    # the upstream's own bytes of this chunk, while the dict says the same
                    self.raw = payload if stripper is None and "usage" not in chunk else None
                    # more of this read follows without a network wait (with a stripper a
                    # payload may vanish, and the next chunk be a wait away: never promised)
                    self.pending = left > 0 and stripper is None
                    yield chunk
                if data is None:
                    # No [DONE]: complete only if every choice said how it finished.
                    if choices_seen and choices_seen <= finished:
                        return
                    raise UpstreamConnectError(
                        self._route_id, "the stream ended before it finished"
                    )
        finally:
            self._clock.stop()  # the stream is over: its timer is not needed

    async def _read(self, started: bool) -> bytes | None:
        """The next bytes from the network (None at the end), within the phase's limit."""
        response, clock, t = self._response, self._clock, self._t
        try:
            if response.ready:  # already here (or the end is): nothing to wait for
                if clock.now() >= clock.deadline:  # ...but the total holds all the same
                    raise UpstreamTimeout(self._route_id, "total")
                return await response.next_bytes()
            if started:
                return await clock.wait(response.next_bytes(), "gap", t.gap)
            return await clock.wait(
                response.next_bytes(), "first_token", t.first_token, since=self._headers_at
            )
        except UpstreamLimitExceeded as exc:
            raise UpstreamProtocolError(self._route_id, str(exc)) from None
        except NETWORK_ERRORS:
            raise UpstreamConnectError(self._route_id, "the stream was cut") from None
        except httpx.HTTPError as exc:
            raise UpstreamProtocolError(
                self._route_id, f"stream failure ({type(exc).__name__})"
            ) from None

    def _decode_chunk(self, payload: bytes) -> dict[str, Any]:
        try:
            chunk = json_codec.loads(payload)
        except ValueError:
            raise UpstreamProtocolError(self._route_id, "malformed JSON in the stream") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError(self._route_id, "a stream event is not a JSON object")
        self._check_error(self._route_id, chunk)
        if not _well_formed_choices(chunk.get("choices")):
            # Checked here so that a bad chunk is the upstream's protocol fault (failover
            # before the first token, stream_interrupted after), not our TypeError later.
            raise UpstreamProtocolError(self._route_id, "a stream chunk has malformed choices")
        if "usage" in chunk:
            normalize_usage(chunk["usage"])
        return chunk

    @staticmethod
    def _strip_chunk(stripper: TextStripper, chunk: dict[str, Any], announced: set[int]) -> bool:
        """Strip leaked text in place; False when the chunk is left with nothing to say.
        A choice's first chunk says its role and is kept for that; `announced`: choices seen."""
        keep = bool(chunk.get("usage"))
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            where = choice_text_key(choice)
            if where is not None:
                holder, key = where
                text = holder.get(key)
                text = stripper.push(index, text) if isinstance(text, str) else ""
                if choice.get("finish_reason"):
                    text += stripper.flush(index)
                if text or isinstance(holder.get(key), str):
                    holder[key] = text
                if text:
                    keep = True
            if choice.get("finish_reason") or chunk_carries_output({"choices": [choice]}):
                keep = True
            delta = choice.get("delta")
            if isinstance(delta, dict) and delta.get("role") and index not in announced:
                keep = True  # the role chunk: clients read the speaker from the first delta
            announced.add(index)
        return keep


def _well_formed_choices(choices: Any) -> bool:
    """None, or a list of objects whose index is an int and whose delta is an object."""
    if choices is None:
        return True
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        index = choice.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int):
            return False
        delta = choice.get("delta")
        if delta is not None and not isinstance(delta, dict):
            return False
    return True
