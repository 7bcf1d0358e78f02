"""Bounded decoding of a compressed upstream body (Content-Encoding gzip or deflate).

    decoder = BoundedDecoder("gzip", limit=32 << 20)
    data = decoder.decode(piece) ...; data += decoder.flush()

We ask every upstream for `identity`; one that compresses anyway is decoded here, never past
`limit` decoded bytes: zlib is asked for 1 MiB at a time, at most what is left of the limit plus
one byte, so a 0.5 MB gzip bomb costs `limit` bytes of memory and an `UpstreamLimitExceeded`,
not 500 MB.
Any other encoding (br, zstd, a chain of several) is refused the same way: we did not ask for
it and decoding it unboundedly is exactly the risk.
"""

from __future__ import annotations

import zlib

_STEP = 1 << 20
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class UpstreamLimitExceeded(Exception):
    """An upstream's response went over one of the transport's limits (size, encoding)."""


class BoundedDecoder:
    __slots__ = ("_encoding", "_limit", "_out", "_raw_deflate", "_zlib")

    def __init__(self, encoding: str, limit: int | None):
        self._encoding = encoding.strip().lower()
        self._limit = limit
        self._out = 0
        wbits = _WBITS.get(self._encoding)
        self._zlib = zlib.decompressobj(wbits) if wbits is not None else None
        self._raw_deflate = False  # "deflate" sent without its zlib header, as some servers do

    def decode(self, data: bytes) -> bytes:
        if self._zlib is None:
            raise UpstreamLimitExceeded(f"unsupported content-encoding {self._encoding[:32]!r}")
        pieces: list[bytes] = []
        while data:  # 1 MiB of output at a time: a bomb is refused before it is all inflated
            room = self._room()
            try:
                piece = self._zlib.decompress(data, _STEP if room == 0 else min(room, _STEP))
            except zlib.error:
                if self._encoding != "deflate" or self._out or self._raw_deflate:
                    raise UpstreamLimitExceeded("malformed compressed body") from None
                self._raw_deflate = True
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.decode(data)
            self._out += len(piece)
            if self._limit is not None and self._out > self._limit:
                raise UpstreamLimitExceeded(f"decompressed body over {self._limit} bytes")
            pieces.append(piece)
            data = self._zlib.unconsumed_tail
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _room(self) -> int:
        """At most this many bytes from zlib (0: no limit): one past the limit tells it broke."""
        return 0 if self._limit is None else self._limit - self._out + 1

    def flush(self) -> bytes:
        if self._zlib is None:
            raise UpstreamLimitExceeded(f"unsupported content-encoding {self._encoding[:32]!r}")
        out = self._zlib.flush(self._room() or zlib.DEF_BUF_SIZE)
        self._out += len(out)
        if self._limit is not None and self._out > self._limit:
            raise UpstreamLimitExceeded(f"decompressed body over {self._limit} bytes")
        return out
