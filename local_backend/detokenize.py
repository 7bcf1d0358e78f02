"""Streaming detokenization: token ids in one at a time, text deltas out.

SentencePiece text is not a concatenation of per-token strings: "▁" stands for a space, the
first piece's dummy-prefix space is dropped, and a character outside the vocabulary arrives as
byte pieces (<0xE2> <0x82> <0xAC> for "€") that are only text together. `StreamDecoder` keeps
the exact bytes of the output and releases the longest prefix that is complete UTF-8, so a
delta never carries half a character; an invalid byte sequence (a model can emit any id)
becomes U+FFFD as soon as it is certainly invalid, exactly as `Tokenizer.decode` would write it.
Invariant (tested): "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids).

Stop strings are the engine's business; `text` (everything released so far) is what it needs.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StreamDecoder:
    """One sequence's text stream. Build it with `Tokenizer.stream_decoder()`."""

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        dummy_prefixed: Sequence[bool],
        control: Sequence[bool],
        *,
        strip_leading_space: bool = True,
    ) -> None:
        self._token_bytes = token_bytes  # the bytes each id stands for ("▁" already a space)
        self._dummy_prefixed = dummy_prefixed  # the id's text starts with a "▁" piece space
        self._control = control  # the id writes nothing (BOS, EOS, [INST], ...)
        self._strip_pending = strip_leading_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.num_tokens = 0

    def push(self, token_id: int) -> str:
        """The text that became certain with this token ("" while a character is incomplete)."""
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        self.num_tokens += 1
        if self._control[token_id]:
            return ""
        data = self._token_bytes[token_id]
        if self._strip_pending:
            # like SentencePiece's decode: only the very first text piece loses its space
            self._strip_pending = False
            if self._dummy_prefixed[token_id]:
                data = data[1:]
        delta = self._utf8.decode(data)
        if delta:
            self._parts.append(delta)
        return delta

    def flush(self) -> str:
        """The end of the sequence: bytes still held (an unfinished character) become U+FFFD."""
        delta = self._utf8.decode(b"", final=True)
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text released so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
