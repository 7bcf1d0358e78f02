"""Server-sent events and OpenAI stream chunks: the parsing every streaming provider shares.

    decoder = SSEDecoder()
    for data in decoder.feed(network_bytes):   # one `data` payload per complete event
        ...
    data = decoder.close()                      # an event the upstream did not terminate

`TextStripper` removes end-of-sequence text that leaks into streamed content (DeepInfra's
`</s>`), also when the leaked text arrives split across chunks: the tail of a chunk that could
be the start of a leaked string is held back until the next chunk says whether it is.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


class EventTooLarge(ValueError):
    """An event (or a line still waiting for its end) is over the decoder's limit."""


class SSEDecoder:
    """Incremental text/event-stream parser (the WHATWG rules the upstreams follow).

    Lines end with CRLF, LF or CR; a blank line ends an event; lines starting with ":" are
    comments (OpenRouter's keep-alive ": OPENROUTER PROCESSING"); several `data:` lines of one
    event are joined with "\\n"; other fields (event, id, retry) are ignored except `event:
    error`, whose payload is returned wrapped so the caller can tell it apart.

    Bounded: an unterminated line is kept as a list of the pieces that brought it (joined once,
    when its end arrives: no quadratic copying however many reads it spans), and an event whose
    data, or a line still waiting for its end, exceeds `max_event_bytes` raises EventTooLarge.
    """

    __slots__ = ("_data", "_data_len", "_event", "_max", "_pending", "_pending_len")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._pending: list[bytes] = []  # an unterminated line, in pieces
        self._pending_len = 0
        self._data: list[bytes] = []
        self._data_len = 0
        self._event = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\n" not in chunk and b"\r" not in chunk:
            if chunk:  # the line goes on: keep the piece, join nothing yet
                self._pending.append(chunk)
                self._pending_len += len(chunk)
                self._check(self._pending_len)
            return []
        if self._pending:
            self._pending.append(chunk)
            buf = b"".join(self._pending)
            self._pending, self._pending_len = [], 0
        else:
            buf = chunk
        out: list[bytes] = []
        # `len(x.split(sep, 1)) == 1` asks "no sep in x" at the least cost: `sep in x` tries the
        # needle as an int first and builds a TypeError; find() parses its arguments the slow
        # way; split() of bytes without sep returns the object itself (callgrind-measured)
        if len(buf.split(b"\r", 1)) == 1:  # LF line ends, as most upstreams send: the short way
            if not self._data and not self._event:  # at an event boundary: whole events first
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    self._check(len(event))  # a whole event in one read is bounded too
                    if event.startswith(b"data:") and len(event.split(b"\n", 1)) == 1:
                        out.append(event[6:] if event[5:6] == b" " else event[5:])
                        continue
                    lines = event.split(b"\n")
                    values = []
                    for line in lines:  # data lines only: joined with "\n", as the rules say
                        if not line.startswith(b"data:"):
                            break
                        values.append(line[6:] if line[5:6] == b" " else line[5:])
                    else:
                        out.append(b"\n".join(values))
                        continue
                    if event:
                        for line in lines:
                            self._line(line, out)
                        self._line(b"", out)
            lines = buf.split(b"\n")
            self._keep(lines.pop())  # an unterminated line waits for more bytes (b"" if none)
            data = self._data
            for line in lines:
                if line.startswith(b"data:"):  # the common line, handled inline
                    value = line[6:] if line[5:6] == b" " else line[5:]
                    data.append(value)
                    self._data_len += len(value)
                else:
                    self._line(line, out)
                    data = self._data  # a blank line dispatched the event: a new list
            self._check(self._data_len)
            return out
        lines = buf.splitlines(keepends=True)
        if lines:
            last = lines[-1]
            # An unterminated line waits for more bytes; so does a trailing CR, which may be
            # the first half of a CRLF split across two network reads.
            if not last.endswith((b"\n", b"\r")) or last.endswith(b"\r"):
                self._keep(lines.pop())
        for line in lines:
            self._line(line.rstrip(b"\r\n"), out)
        self._check(self._data_len)
        return out

    def close(self) -> list[bytes]:
        """End of stream: what a final unterminated event carried."""
        out: list[bytes] = []
        if self._pending:
            line = b"".join(self._pending)
            self._pending, self._pending_len = [], 0
            self._line(line.rstrip(b"\r\n"), out)
        self._line(b"", out)
        return out

    def _keep(self, rest: bytes) -> None:
        if rest:
            self._pending.append(rest)
            self._pending_len += len(rest)
            self._check(self._pending_len)

    def _check(self, size: int) -> None:
        if size > self._max:
            raise EventTooLarge(f"a stream event is over {self._max} bytes")

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            if self._data:
                data = b"\n".join(self._data)
                if self._event == b"error":
                    data = b'{"error": ' + data + b"}" if data.startswith(b"{") else data
                out.append(data)
            self._data = []
            self._data_len = 0
            self._event = b""
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            self._data_len += len(value)
        elif field == b"event":
            self._event = value


class TextStripper:
    """Removes the given strings from each choice's streamed text, across chunk boundaries."""

    __slots__ = ("_held", "_strips")

    def __init__(self, strips: tuple[str, ...]):
        self._strips = tuple(s for s in strips if s)
        self._held: dict[int, str] = {}

    def push(self, index: int, text: str) -> str:
        held = self._held.pop(index, "")
        text = held + text if held else text
        changed = True
        while changed:  # removing one occurrence can join the halves of another
            changed = False
            for s in self._strips:
                if s in text:
                    text = text.replace(s, "")
                    changed = True
        keep = self._partial_tail(text)
        if keep:
            self._held[index] = text[-keep:]
            text = text[:-keep]
        return text

    def flush(self, index: int) -> str:
        """The held-back tail of a choice that ended: it was not a leaked string after all."""
        return self._held.pop(index, "")

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a strip string."""
        best = 0
        for s in self._strips:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def choice_text_key(choice: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """Where a stream choice keeps its text: (delta, "content") for chat, (choice, "text")."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta, "content"
    if "text" in choice:
        return choice, "text"
    return None


_OUTPUT_DELTA_KEYS = ("tool_calls", "function_call", "refusal", "reasoning", "reasoning_content")


def chunk_carries_output(chunk: dict[str, Any]) -> bool:
    """True when a chunk has something a client would see as the answer starting (or ending):
    text, a tool call, a refusal, or a finish_reason. A role-only chunk does not."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if delta.get("content"):
                return True
            if any(delta.get(key) for key in _OUTPUT_DELTA_KEYS):
                return True
        elif choice.get("text"):
            return True
    return False


def normalize_usage(usage: Any) -> Any:
    """An upstream's own price of the call (DeepInfra's `estimated_cost`, OpenRouter's `cost`)
    moves to `cost_details.upstream_inference_cost`: `usage.cost` is the gateway's to set."""
    if not isinstance(usage, dict):
        return usage
    upstream_cost = usage.pop("estimated_cost", None)
    if "cost" in usage:
        own = usage.pop("cost")
        upstream_cost = own if upstream_cost is None else upstream_cost
    if upstream_cost is not None:
        details = usage.get("cost_details")
        details = dict(details) if isinstance(details, dict) else {}
        details.setdefault("upstream_inference_cost", upstream_cost)
        usage["cost_details"] = details
    return usage
