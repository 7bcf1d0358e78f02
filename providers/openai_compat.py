"""The four hosted providers: one OpenAI-compatible HTTP client each, quirks from the catalog.

    provider = OpenAICompatProvider("deepinfra", base_url, api_key, strip_text=("</s>",))
    result = await provider.chat(ProviderRequest(route_id, slug, body, "chat", timeouts))

One `httpx.AsyncClient` per provider lives as long as the app: it holds the provider's default
headers and its pooled keep-alive transport (providers/http1.py). Requests skip httpx's
per-request objects: the request line and headers are encoded once per endpoint, and each call
hands that head plus its JSON body to the transport's `request()`; the client's per-request
pipeline (auth flow, redirects, cookie jar, event hooks; none of which we use) and httpx's
Request/Response objects cost about 0.3 ms a request on the 2-core machines we measure on
(bench/overhead.py). So cookies an upstream sets are never kept either.
Each call enforces the phase timeouts it is given, each raising `UpstreamTimeout(phase)`:
connect (httpx's connect timeout), headers (request sent -> status line), first_token (headers
-> first chunk with output, or the whole body of a non-stream), gap (between two network reads
of a stream) and total (the whole attempt; whichever phase it cuts short is reported "total").
Upstream statuses map onto the errors tree (401/403 UpstreamAuthError, 429 with Retry-After
seconds or HTTP date, 5xx, ...). Messages are built from the route id and the status only; an
upstream's own error text is redacted (our key included) and cut short before it is kept.
An upstream that echoes our key in a 200 answer never gets it relayed: the key is scrubbed from
the body (and from each stream event) wherever its literal bytes occur (one `in` test each).

Limits (plain arguments; the gateway passes its settings): `max_body_bytes` (a JSON answer or
an error body), `max_decompressed_bytes`, `max_header_bytes` (the transport's) and
`max_sse_line_bytes` (one stream event). Over a limit is the upstream's protocol error: the
connection is dropped at once and the dispatcher fails over.
"""

from __future__ import annotations

import email.utils
import functools
import json
import ssl
import time
from typing import Any, NoReturn

import httpx

from providers import json_codec
from providers.base import PhaseTimeouts, ProviderRequest, ProviderResponse
from providers.errors import (
    RequestNotEncodable,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    redact,
)
from providers.http1 import (
    Http1Response,
    Http1Transport,
    Origin,
    UpstreamLimitExceeded,
    origin_of,
    request_head,
)
from providers.openai_stream import OpenAIStream
from providers.phase_clock import NETWORK_ERRORS, PhaseClock
from providers.sse import TextStripper, normalize_usage

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}
_DETAIL_CHARS = 200
REDACTED = b"[redacted]"
MIN_SECRET_CHARS = 8


def scrub(raw: bytes, secret: bytes) -> bytes:
    """`raw` without the literal `secret` (cheap when it is absent: one search)."""
    return raw.replace(secret, REDACTED) if secret and secret in raw else raw


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no answer


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context (CA bundle loaded once) for every provider's client: loading it costs
    tens of milliseconds per client otherwise."""
    return httpx.create_ssl_context()


class OpenAICompatProvider:
    """A hosted OpenAI-compatible API (Lepton, Novita, OpenRouter, DeepInfra)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str,
        *,
        headers: dict[str, str] | None = None,
        strip_text: tuple[str, ...] = (),
        max_connections: int = 256,
        transport: Http1Transport | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
        max_decompressed_bytes: int = 16 * 1024 * 1024,
        max_header_bytes: int = 64 * 1024,
        max_sse_line_bytes: int = 1024 * 1024,
    ):
        self.name = name
        self._secret = (api_key,)
        # what to scrub from answers; a placeholder too short to be a secret ("local") is not
        self._key = api_key.encode("utf-8") if len(api_key) >= MIN_SECRET_CHARS else b""
        self._strip = tuple(s for s in strip_text if s)
        self._max_body = max_body_bytes
        self._max_decoded = max_decompressed_bytes
        self._max_line = max_sse_line_bytes
        base_url = base_url.rstrip("/")
        self._transport = transport or Http1Transport(
            ssl_context=shared_ssl_context(),
            max_connections=max_connections,
            max_header_bytes=max_header_bytes,
        )
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={
                "authorization": f"Bearer {api_key}",
                "content-type": "application/json",
                # Small JSON and event streams: compression only adds CPU on both ends and
                # would make a proxy buffer the stream.
                "accept-encoding": "identity",
                **(headers or {}),
            },
            follow_redirects=False,
            trust_env=False,  # never pick up a proxy with credentials from the environment
            transport=self._transport,
        )
        # Each endpoint's URL, origin and request head (line + headers), encoded once.
        self._urls = {endpoint: httpx.URL(base_url + path) for endpoint, path in _PATHS.items()}
        self._heads: dict[str, tuple[Origin, bytes]] = {
            endpoint: (origin_of(url), request_head("POST", url, self._client.headers.raw))
            for endpoint, url in self._urls.items()
        }

    async def ready(self) -> bool:
        return not self._client.is_closed

    def has_capacity(self) -> bool:
        return True

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- one attempt ---------------------------------------------------------------------------

    async def chat(self, request: ProviderRequest) -> ProviderResponse | OpenAIStream:
        t = request.timeouts
        body = dict(request.body)
        body["model"] = request.slug
        try:
            content = json_codec.dumps(body)
        except (ValueError, TypeError, RecursionError) as exc:
            # our encoder's failure (e.g. nesting beyond its limit): no route is at fault
            raise RequestNotEncodable(type(exc).__name__) from None
        origin, head = self._heads[request.endpoint]
        if request.extra_headers:
            headers = httpx.Headers(self._client.headers)
            headers.update(request.extra_headers)
            head = request_head("POST", self._urls[request.endpoint], headers.raw)
        head += b"content-length: %d\r\n\r\n" % len(content)
        clock = PhaseClock(request.route_id, t.total)
        try:
            response = await self._send(origin, head, content, clock, t)
            raw = await self._read(request, response, clock)
        except BaseException:
            clock.stop()
            raise
        if isinstance(raw, OpenAIStream):
            return raw  # the clock goes on with the stream, which stops it
        clock.stop()
        data = self._decode_body(request.route_id, raw)
        if request.stream:
            # A JSON answer to a stream request: an error, or a provider ignoring `stream`.
            raise UpstreamProtocolError(request.route_id, "expected an event stream, got JSON")
        return ProviderResponse(
            body=data, upstream_id=data.get("id"), ttft_s=clock.now() - clock.start
        )

    async def _read(
        self, request: ProviderRequest, response: Http1Response, clock: PhaseClock
    ) -> bytes | OpenAIStream:
        """The body of a JSON answer, or the stream a stream request was answered with."""
        t = request.timeouts
        try:
            if response.status >= 300:
                await self._raise_for_status(response, clock, t)
            if request.stream and (response.header(b"content-type") or "").startswith(
                "text/event-stream"
            ):
                response.unlimit()  # a stream is bounded per event (and by the deadline)
                return OpenAIStream(
                    request.route_id,
                    response,
                    clock,
                    t,
                    self._strip,
                    self.raise_embedded_error,
                    secret=self._key,
                    max_event_bytes=self._max_line,
                )
            if response.complete:  # all here already: nothing to wait for, nothing to time
                return await response.aread()
            return await clock.wait(response.aread(), "first_token", t.first_token)
        except UpstreamError:
            await response.aclose()
            raise
        except UpstreamLimitExceeded as exc:
            await response.aclose()
            raise UpstreamProtocolError(request.route_id, str(exc)) from None
        except NETWORK_ERRORS:
            await response.aclose()
            raise UpstreamConnectError(
                request.route_id, "connection lost reading the body"
            ) from None
        except BaseException:
            await response.aclose()
            raise

    async def _send(
        self, origin: Origin, head: bytes, content: bytes, clock: PhaseClock, t: PhaseTimeouts
    ) -> Http1Response:
        route_id = clock.route_id
        connect = min(t.connect, t.total)
        try:
            # The headers phase starts once connected; a slow connect has its own limit.
            return await clock.wait(
                self._transport.request(
                    origin,
                    head,
                    content,
                    pool_timeout=connect,
                    connect_timeout=connect,
                    max_body_bytes=self._max_body,
                    max_decoded_bytes=self._max_decoded,
                ),
                "headers",
                t.connect + t.headers,
            )
        except UpstreamLimitExceeded as exc:
            raise UpstreamProtocolError(route_id, str(exc)) from None
        except (httpx.ConnectTimeout, httpx.PoolTimeout):
            raise UpstreamTimeout(route_id, "connect") from None
        except httpx.ConnectError:
            raise UpstreamConnectError(route_id, "could not connect") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout(route_id, "headers") from None
        except NETWORK_ERRORS:
            raise UpstreamConnectError(route_id, "connection closed before a response") from None
        except httpx.HTTPError as exc:
            raise UpstreamProtocolError(route_id, f"HTTP failure ({type(exc).__name__})") from None

    async def _raise_for_status(
        self, response: Http1Response, clock: PhaseClock, t: PhaseTimeouts
    ) -> NoReturn:
        route_id, status = clock.route_id, response.status
        if status in (401, 403):
            raise UpstreamAuthError(route_id, status)
        try:
            raw = await clock.wait(response.aread(), "first_token", min(t.gap, t.first_token))
        except (UpstreamTimeout, UpstreamLimitExceeded, *NETWORK_ERRORS):
            raw = b""
        detail = self._error_detail(raw)
        retry_after = parse_retry_after(response.header(b"retry-after"))
        raise UpstreamHTTPError(route_id, status, detail, retry_after=retry_after)

    def _error_detail(self, raw: bytes | str) -> str:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            error = data.get("error", data)
            while isinstance(error, dict) and "error" in error:
                error = error["error"]
            if isinstance(error, dict):
                message = error.get("message") or error.get("detail") or ""
                text = message if isinstance(message, str) else json.dumps(message)
            elif isinstance(error, str):
                text = error
        # Redact before cutting: a key straddling the cut would lose its literal match and
        # leave its prefix behind.
        return redact(" ".join(text.split()), self._secret)[:_DETAIL_CHARS]

    def _decode_body(self, route_id: str, raw: bytes) -> dict[str, Any]:
        raw = scrub(raw, self._key)
        try:
            data = json_codec.loads(raw)
        except ValueError:
            raise UpstreamProtocolError(route_id, "malformed JSON body") from None
        if not isinstance(data, dict):
            raise UpstreamProtocolError(route_id, "the body is not a JSON object")
        self.raise_embedded_error(route_id, data)
        choices = data.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise UpstreamProtocolError(route_id, "the body has no choices")
        if self._strip:
            stripper = TextStripper(self._strip)
            for i, choice in enumerate(choices):
                message = choice.get("message")
                holder, key = (
                    (message, "content") if isinstance(message, dict) else (choice, "text")
                )
                if isinstance(holder.get(key), str):
                    holder[key] = stripper.push(i, holder[key]) + stripper.flush(i)
        normalize_usage(data.get("usage"))
        return data

    def raise_embedded_error(self, route_id: str, data: dict[str, Any]) -> None:
        """A 200 that carries `{"error": ...}` (in a body or mid-stream) is a failed attempt."""
        error = data.get("error")
        if not error:
            return
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
        raise UpstreamHTTPError(route_id, status, self._error_detail(json.dumps(data)))
