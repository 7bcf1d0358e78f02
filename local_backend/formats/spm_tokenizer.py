"""SentencePiece's exact token ids from a `tokenizer.json`, with the `tokenizers` package only.

Used by the gateway's counter (`gateway/routing/tokens.py`, on the files that
`scripts/make_tokenizer_json.py` generates into `local_backend/formats/tokenizer_data/`) and
by the local backend's tokenizer when a model folder has a `tokenizer.json` but no
`tokenizer.model`. It has no
dependency beyond `tokenizers`, so the gateway stays light (no sentencepiece, no torch).

Two places where a plain `Tokenizer.encode` differs from SentencePiece, fixed here:
- control tokens ([INST], </s>, ...) are special added tokens in a tokenizer.json, and plain
  encoding would turn the literal text "[INST]" in a user message into the control token (a
  prompt injection). SentencePiece never produces a control piece from text, so we set
  `encode_special_tokens = True`: such text is encoded like any other text.
- user-defined pieces (v3's "[REFERENCE_DOC_n]") are non-special added tokens: the `tokenizers`
  package splits them out first and then prepends the dummy-prefix "▁" to every remaining
  piece of text, whereas SentencePiece adds it once, at the start of the whole text. Texts that
  contain such a piece are split here and the parts after the first are encoded without the
  dummy prefix (a second tokenizer without the Prepend normalizer / Metaspace prefix).
Known remaining difference: a tokenizer.json in the newer, non-legacy layout (Metaspace with
prepend_scheme "first") does not add the dummy prefix before a text that starts with a space;
the files we generate and Mistral's published ones use the legacy Prepend normalizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.models import BPE

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE_PIECE = "▁"


class SpmJsonTokenizer:
    """A SentencePiece model saved as tokenizer.json; `encode` returns SentencePiece's ids."""

    def __init__(self, json_text: str, source: str = "<string>") -> None:
        self.source = source
        self._json_text = json_text  # kept for the continuation tokenizer, built when needed
        self._tokenizer = Tokenizer.from_str(json_text)
        self._tokenizer.encode_special_tokens = True
        model = self._tokenizer.model
        if not isinstance(model, BPE):
            raise ValueError(f"{source}: not a SentencePiece BPE tokenizer.json")

        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.pieces: list[str] = [
            self._tokenizer.id_to_token(i) or "" for i in range(self.vocab_size)
        ]
        added = self._tokenizer.get_added_tokens_decoder()
        self.control_ids = frozenset(i for i, tok in added.items() if tok.special)
        user_defined = {tok.content: i for i, tok in added.items() if not tok.special}
        self.user_defined_ids = frozenset(user_defined.values())
        self.byte_values: dict[int, int] = {}
        if model.byte_fallback:
            for token_id, piece in enumerate(self.pieces):
                if match := BYTE_PIECE.fullmatch(piece):
                    self.byte_values[token_id] = int(match.group(1), 16)
        self.unk_id = self._required_id(model.unk_token or "<unk>")
        self.bos_id = self._required_id("<s>")
        self.eos_id = self._required_id("</s>")

        parts = {"normalizer": self._tokenizer.normalizer}
        parts["pre_tokenizer"] = self._tokenizer.pre_tokenizer
        states = {k: json.loads(v.__getstate__()) for k, v in parts.items() if v is not None}
        self.adds_dummy_prefix = _without_dummy_prefix(states)
        self._space_id = self._tokenizer.token_to_id(SPACE_PIECE)
        self._user_defined = user_defined
        self._user_defined_re: re.Pattern[str] | None = None
        self._continuation: Tokenizer | None = None
        if user_defined:
            # longest first: SentencePiece matches user-defined pieces by longest prefix
            alternatives = sorted(user_defined, key=len, reverse=True)
            self._user_defined_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_file(cls, path: str | Path) -> SpmJsonTokenizer:
        path = Path(path)
        return cls(path.read_text(encoding="utf-8"), source=str(path))

    def _required_id(self, piece: str) -> int:
        token_id = self._tokenizer.token_to_id(piece)
        if token_id is None:
            raise ValueError(f"{self.source}: no {piece!r} token")
        return int(token_id)

    def token_to_id(self, piece: str) -> int | None:
        return self._tokenizer.token_to_id(piece)

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """SentencePiece's ids for `text` (no BOS/EOS); "" gives []."""
        if self._user_defined_re is not None and self._user_defined_re.search(text):
            return self._encode_with_user_defined(text)
        return self._encode_plain(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text; the plain ones in one parallel call of the Rust tokenizer."""
        out: list[list[int]] = [[] for _ in texts]
        plain: list[int] = []
        for index, text in enumerate(texts):
            if self._user_defined_re is not None and self._user_defined_re.search(text):
                out[index] = self._encode_with_user_defined(text)
            elif text:
                plain.append(index)
        if plain:
            # the fast variant skips offsets: same ids, about twice as fast
            encodings = self._tokenizer.encode_batch_fast(
                [texts[i] for i in plain], add_special_tokens=False
            )
            for index, encoding in zip(plain, encodings, strict=True):
                out[index] = list(encoding.ids)
        return out

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        encoding = self._tokenizer.encode_batch_fast([text], add_special_tokens=False)[0]
        return list(encoding.ids)

    def _encode_with_user_defined(self, text: str) -> list[int]:
        assert self._user_defined_re is not None
        parts = self._user_defined_re.split(text)  # [text, piece, text, piece, ..., text]
        if parts[0]:
            ids = self._encode_plain(parts[0])
        elif self.adds_dummy_prefix and self._space_id is not None:
            ids = [self._space_id]  # SentencePiece's dummy prefix, alone before the piece
        else:
            ids = []
        continuation = self._continuation_tokenizer()
        for index in range(1, len(parts), 2):
            ids.append(self._user_defined[parts[index]])
            if following := parts[index + 1]:
                ids.extend(continuation.encode(following, add_special_tokens=False).ids)
        return ids

    def _continuation_tokenizer(self) -> Tokenizer:
        """This tokenizer without the dummy prefix (for text after a user-defined piece)."""
        if self._continuation is None:
            spec = json.loads(self._json_text)
            _without_dummy_prefix(spec)
            continuation = Tokenizer.from_str(json.dumps(spec))
            continuation.encode_special_tokens = True
            self._continuation = continuation
        return self._continuation


def _without_dummy_prefix(spec: dict[str, Any]) -> bool:
    """Drop the dummy prefix from spec["normalizer"] / spec["pre_tokenizer"] in place (the
    legacy Prepend("▁") normalizer, or a Metaspace's prepend_scheme); whether there was one."""
    found = False
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") == "Prepend":
        spec["normalizer"], found = None, True
    elif normalizer and normalizer.get("type") == "Sequence":
        kept = [n for n in normalizer["normalizers"] if n.get("type") != "Prepend"]
        found = len(kept) != len(normalizer["normalizers"])
        normalizer["normalizers"] = kept
    pre_tokenizer = spec.get("pre_tokenizer")
    metaspaces = []
    if pre_tokenizer and pre_tokenizer.get("type") == "Metaspace":
        metaspaces = [pre_tokenizer]
    elif pre_tokenizer and pre_tokenizer.get("type") == "Sequence":
        metaspaces = [p for p in pre_tokenizer["pretokenizers"] if p.get("type") == "Metaspace"]
    for metaspace in metaspaces:
        found = found or metaspace.get("prepend_scheme", "always") != "never"
        metaspace["prepend_scheme"] = "never"
    return found
