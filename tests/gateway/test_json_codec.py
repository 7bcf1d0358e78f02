"""providers/json_codec.py: orjson, and the standard library for what orjson refuses."""

from __future__ import annotations

import json

import pytest

from providers import json_codec


def test_round_trip_is_compact_utf8() -> None:
    data = {"text": "héllo 日本 🙂", "n": [1, 2.5, None, True], "nested": {"a": {}}}
    raw = json_codec.dumps(data)
    # compact, and non-ASCII text as itself rather than \\u escapes
    assert raw == json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    assert json_codec.loads(raw) == data == json.loads(raw)
    assert json_codec.loads(raw.decode()) == data  # str input too


def test_what_orjson_refuses_to_read_still_reads_as_before() -> None:
    big = 2**70
    assert json_codec.loads(b'{"n": %d}' % big) == {"n": big}
    assert json_codec.loads('{"s": "\\ud800"}') == {"s": "\ud800"}  # a lone surrogate
    assert json_codec.loads('{"a": 1}'.encode("utf-16")) == {"a": 1}


def test_what_orjson_refuses_to_write_is_written_by_json() -> None:
    big = {"n": 2**70, "s": "\ud800"}
    raw = json_codec.dumps(big)
    assert json.loads(raw) == big


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"nope", b'{"a": }', b"\xff\xfe\x00", b"[NaN]", b'{"t": -Infinity}']
)
def test_not_json_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        json_codec.loads(raw)
