"""The local backend's tokenizer: SentencePiece's exact ids, from whichever file a model has.

Sources (`Tokenizer.from_model_dir` tries them in this order):
1. `tokenizer.model` (or Mistral's `tokenizer.model.v3` naming) read with sentencepiece -- the
   file the models were trained with, and what mistral-common encodes with;
2. `tokenizer.json` read with `tokenizers` through
   `local_backend.formats.spm_tokenizer.SpmJsonTokenizer`,
   which fixes the two ways a plain tokenizer.json differs from SentencePiece (control tokens
   from text, user-defined pieces) -- also the path when sentencepiece is not installed.
Without a model folder, `Tokenizer.for_model` uses the files the installed mistral-common ships:
`tokenizer.model.v1` (WizardLM-2) and `mistral_instruct_tokenizer_240323.model.v3`
(Mixtral-8x22B-Instruct).

Decoding does not go through either library: each id maps to its exact bytes (pieces with "▁"
as a space, byte pieces as their byte, control tokens as nothing, <unk> as " ⁇ " like
SentencePiece), the very first text piece loses its dummy-prefix space, and the bytes are read
as UTF-8 with U+FFFD for invalid sequences. `StreamDecoder` (detokenize.py) uses the same table,
so streamed deltas always add up to `decode`. For valid text `decode` equals SentencePiece's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from local_backend.detokenize import StreamDecoder
from local_backend.formats.prompt_format import FORMAT_TOKENIZER, format_for_model
from local_backend.formats.spm_tokenizer import BYTE_PIECE, SPACE_PIECE, SpmJsonTokenizer

MISTRAL_COMMON_FILES = {
    "v1": "tokenizer.model.v1",  # WizardLM-2 (Mixtral-8x22B base vocabulary, 32000)
    "v3": "mistral_instruct_tokenizer_240323.model.v3",  # Mixtral-8x22B-Instruct (32768)
}
UNK_SURFACE = " ⁇ "  # how SentencePiece writes <unk>


class _Backend(Protocol):
    pieces: list[str]
    control_ids: frozenset[int]
    byte_values: dict[int, int]
    unk_id: int
    bos_id: int
    eos_id: int
    adds_dummy_prefix: bool

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class _SentencePieceBackend:
    def __init__(self, path: Path) -> None:
        try:
            import sentencepiece
        except ImportError as exc:  # the gateway-only install has no sentencepiece
            raise ImportError("reading tokenizer.model needs sentencepiece") from exc
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        size = self._sp.get_piece_size()
        self.pieces = [self._sp.id_to_piece(i) for i in range(size)]
        self.control_ids = frozenset(i for i in range(size) if self._sp.is_control(i))
        self.byte_values = {
            i: int(BYTE_PIECE.fullmatch(self.pieces[i]).group(1), 16)  # type: ignore[union-attr]
            for i in range(size)
            if self._sp.is_byte(i)
        }
        self.unk_id, self.bos_id, self.eos_id = (
            self._sp.unk_id(),
            self._sp.bos_id(),
            self._sp.eos_id(),
        )
        # the normalizer spec is not exposed; a dummy prefix shows on any encoded text
        self.adds_dummy_prefix = self.pieces[self._sp.encode("a")[0]].startswith(SPACE_PIECE)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))] if texts else []


class Tokenizer:
    """encode / decode with exact SentencePiece ids; see the module doc for the sources."""

    def __init__(self, backend: _Backend, source: str) -> None:
        self._backend = backend
        self.source = source
        self.vocab_size = len(backend.pieces)
        self.bos_id, self.eos_id, self.unk_id = backend.bos_id, backend.eos_id, backend.unk_id
        self.control_ids = backend.control_ids - {backend.unk_id}
        self._piece_ids = {piece: i for i, piece in enumerate(backend.pieces)}
        token_bytes, dummy_prefixed = [], []
        for token_id, piece in enumerate(backend.pieces):
            if token_id in self.control_ids:
                data = b""
            elif token_id == backend.unk_id:
                data = UNK_SURFACE.encode()
            elif token_id in backend.byte_values:
                data = bytes([backend.byte_values[token_id]])
            else:
                data = piece.replace(SPACE_PIECE, " ").encode()
            token_bytes.append(data)
            dummy_prefixed.append(
                backend.adds_dummy_prefix
                and token_id not in backend.byte_values
                and token_id != backend.unk_id
                and piece.startswith(SPACE_PIECE)
            )
        self._token_bytes = tuple(token_bytes)
        self._dummy_prefixed = tuple(dummy_prefixed)
        self._control = tuple(i in self.control_ids for i in range(self.vocab_size))

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_sentencepiece(cls, path: str | Path) -> Tokenizer:
        return cls(_SentencePieceBackend(Path(path)), source=str(path))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> Tokenizer:
        return cls(SpmJsonTokenizer.from_file(path), source=str(path))

    @classmethod
    def from_mistral_common(cls, version: str) -> Tokenizer:
        """The "v1" or "v3" SentencePiece file shipped by the installed mistral-common."""
        if version not in MISTRAL_COMMON_FILES:
            raise ValueError(f"unknown tokenizer version {version!r} (known: v1, v3)")
        spec = importlib.util.find_spec("mistral_common")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("mistral-common is not installed: no bundled tokenizer files")
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        return cls.from_sentencepiece(data / MISTRAL_COMMON_FILES[version])

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenizer:
        """tokenizer.model (when sentencepiece is installed), else tokenizer.json."""
        folder = Path(model_dir)
        sentencepiece_files = [
            folder / "tokenizer.model",
            *sorted(folder.glob("tokenizer.model.v*")),
        ]
        json_file = folder / "tokenizer.json"
        has_sentencepiece = importlib.util.find_spec("sentencepiece") is not None
        for path in sentencepiece_files:
            if path.is_file() and (has_sentencepiece or not json_file.is_file()):
                return cls.from_sentencepiece(path)
        if json_file.is_file():
            return cls.from_tokenizer_json(json_file)
        raise FileNotFoundError(f"{folder}: no tokenizer.model or tokenizer.json")

    @classmethod
    def for_model(cls, name: str, model_dir: str | Path | None = None) -> Tokenizer:
        """The model folder's own tokenizer when given, else mistral-common's file for `name`."""
        if model_dir is not None:
            return cls.from_model_dir(model_dir)
        return cls.from_mistral_common(FORMAT_TOKENIZER[format_for_model(name)])

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; BOS / EOS added only when asked. Text never yields control ids."""
        ids = self._backend.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._backend.encode_batch(texts)

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`: control tokens write nothing, the first piece loses its "▁"."""
        data = bytearray()
        first = True
        for token_id in ids:
            self._check(token_id)
            if self._control[token_id]:
                continue
            piece = self._token_bytes[token_id]
            if first and self._dummy_prefixed[token_id]:
                piece = piece[1:]
            first = False
            data += piece
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, strip_leading_space: bool = True) -> StreamDecoder:
        """A decoder for one generated sequence (deltas add up to `decode` of its ids)."""
        return StreamDecoder(
            self._token_bytes,
            self._dummy_prefixed,
            self._control,
            strip_leading_space=strip_leading_space,
        )

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this id writes mid-text ("▁" as a space), e.g. for logprobs' `bytes`."""
        self._check(token_id)
        return self._token_bytes[token_id]

    # -- vocabulary ----------------------------------------------------------------------------

    def id_to_piece(self, token_id: int) -> str:
        self._check(token_id)
        return self._backend.pieces[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        return self._piece_ids.get(piece)

    def control_id(self, piece: str) -> int:
        """The id of a control token such as "[INST]"; KeyError when this vocabulary lacks it."""
        token_id = self._piece_ids.get(piece)
        if token_id is None or token_id not in self.control_ids:
            raise KeyError(f"{self.source}: no control token {piece!r}")
        return token_id

    def is_control(self, token_id: int) -> bool:
        return token_id in self.control_ids

    def _check(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"
