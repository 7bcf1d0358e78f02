"""How deeply a raw JSON body nests, checked before anything parses it.

    if nesting_exceeds(raw, 64): raise InvalidRequest(...)

Why before parsing: a body nested ~1000 levels deep parses (orjson allows 1024) but breaks
every recursive step after it (the encoder building the upstream body gives up near 255
levels; the stdlib fallback raises RecursionError), and those failures must not happen at all,
let alone be blamed on a route.

How, without recursion: a body with at most `limit` brackets cannot nest deeper, so a usual
body costs two `bytes.count`s. Otherwise strings are cut out (a "[" inside text is not
nesting), only the brackets are kept, and the running depth's maximum is taken with C-level
iterators (open -> 2, close -> 0: the running sum minus the position is the depth). That is a
few hundred ns per bracket: under what parsing the same body costs.
"""

from __future__ import annotations

import re
from itertools import accumulate, count
from operator import sub

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DELTAS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def nesting_exceeds(raw: bytes, limit: int) -> bool:
    """True when the JSON text `raw` nests arrays/objects more than `limit` levels deep (`[]`
    is one level). Unbalanced brackets may answer either way: that body is no JSON anyway."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    deltas = brackets.translate(_DELTAS)
    return max(map(sub, accumulate(deltas), count(1))) > limit
