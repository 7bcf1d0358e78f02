"""JSON on the request path: orjson, with the standard library for what orjson refuses.

    data = loads(raw)      # bytes or str -> Any; ValueError when it is not JSON
    raw = dumps(data)      # -> compact UTF-8 bytes

Every request parses the client's body and the upstream's answer and writes both back out, and
a stream does that for each of its chunks: with the standard library that was ~0.1 ms of a
stream's gateway time on our 2-core machines, with orjson a tenth of it (bench/overhead.py).
orjson writes compact UTF-8 (non-ASCII text as itself rather than \\u escapes; valid JSON
either way). What it refuses and `json` accepts — NaN and Infinity literals, integers beyond 64
bits, lone surrogates, UTF-16/32 input — falls back to `json`, except the NaN / Infinity
literals: they are not JSON, and accepted they would slip past every range check (a NaN
`max_price` disables the price filter), so they are refused as invalid JSON.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # raises ValueError (json.JSONDecodeError) when it is not JSON
        return json.loads(raw, parse_constant=_refuse_constant)


def dumps(data: Any) -> bytes:
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits, a lone surrogate
        return json.dumps(data, separators=(",", ":")).encode()
