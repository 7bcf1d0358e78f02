"""Generate local_backend/formats/tokenizer_data/{v1,v3}.tokenizer.json from mistral-common's
SentencePiece files.

The gateway counts prompt tokens with the `tokenizers` package only (no sentencepiece, no
mistral-common, no torch), so it needs the two SentencePiece BPE models as `tokenizer.json`.
Run once, commit the output:

    .venv/bin/python scripts/make_tokenizer_json.py   # writes local_backend/formats/tokenizer_data/
    .venv/bin/python scripts/make_tokenizer_json.py --check    # fails if the files are stale

Why our own conversion rather than transformers' LlamaConverter: that one needs protobuf (not a
dependency of ours), and it does not let us choose the merge order that SentencePiece's ties
require (below). The pieces are read straight from the .model file with a tiny protobuf
wire-format reader.

How SentencePiece BPE encodes (and what the JSON reproduces):
- normalization: identity, a dummy-prefix "▁" before the text, spaces become "▁" -> the JSON's
  normalizer is Prepend("▁") + Replace(" ", "▁") (the "legacy" Llama layout);
- the text starts as one symbol per character; SentencePiece repeatedly merges the adjacent pair
  whose concatenation is a NORMAL piece with the highest score, leftmost first on ties;
  characters that are no piece become byte pieces <0xXX> (byte fallback) -> a BPE model whose
  merges are every split (left, right) of every NORMAL piece into two NORMAL pieces, ranked by
  the merged piece's score. Control, byte, unknown and user-defined pieces are never formed by
  merges, so they get no merges.
- ties: the only equal scores among NORMAL pieces are the whitespace runs "▁▁" .. "▁"*16 (all
  -1e9). SentencePiece merges them leftmost first, which grows one run from its left end; the
  ranks reproduce that by putting (run, "▁") before ("▁", "▁") -- longer left part first.
- speed: no piece has "▁" after another character, so words "▁*[^▁]+" are encoded apart
  (a Split pre-tokenizer): same ids, and the per-word cache makes long texts ~Nx faster.
- control pieces (<unk>, <s>, </s>, [INST], ...) are special added tokens, user-defined pieces
  ([REFERENCE_DOC_n] in v3) non-special added tokens, as in Hugging Face's own conversions.
  Loaders must set `encode_special_tokens = True` (text never yields a control token in
  SentencePiece) -- local_backend/formats/spm_tokenizer.py does, and also handles user-defined
  pieces exactly.
tests/test_tokens.py proves ids equal SentencePiece's on a varied corpus.
"""

from __future__ import annotations

import argparse
import importlib.util
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "local_backend" / "formats" / "tokenizer_data"
SOURCES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}

# sentencepiece_model.proto: SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL_TYPE = 2


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    type: int


@dataclass(frozen=True)
class SpmModel:
    pieces: list[Piece]
    model_type: int
    byte_fallback: bool
    normalizer_name: str
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    unk_id: int


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes | float]]:
    """(field number, value) of one protobuf message; enough of the wire format for .model."""
    out: list[tuple[int, int | bytes | float]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((field, value))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            out.append((field, buf[pos : pos + length]))
            pos += length
        elif wire == 5:
            out.append((field, struct.unpack("<f", buf[pos : pos + 4])[0]))
            pos += 4
        elif wire == 1:
            out.append((field, struct.unpack("<d", buf[pos : pos + 8])[0]))
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def read_spm_model(path: Path) -> SpmModel:
    """ModelProto: 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec, 3 normalizer_spec."""
    pieces: list[Piece] = []
    trainer: dict[int, int | bytes | float] = {}
    normalizer: dict[int, int | bytes | float] = {}
    for field, value in _fields(path.read_bytes()):
        assert isinstance(value, bytes)
        if field == 1:
            attrs = dict(_fields(value))
            text = attrs.get(1, b"")
            assert isinstance(text, bytes)
            pieces.append(Piece(text.decode(), float(attrs.get(2, 0.0)), int(attrs.get(3, NORMAL))))
        elif field == 2:
            trainer = dict(_fields(value))
        elif field == 3:
            normalizer = dict(_fields(value))
    name = normalizer.get(1, b"nmt_nfkc")
    assert isinstance(name, bytes)
    return SpmModel(
        pieces=pieces,
        model_type=int(trainer.get(3, 1)),  # proto2 defaults: UNIGRAM
        byte_fallback=bool(trainer.get(35, 0)),
        normalizer_name=name.decode(),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        unk_id=int(trainer.get(40, 0)),
    )


def bpe_merges(pieces: list[Piece]) -> list[tuple[str, str]]:
    """Every split of a NORMAL piece into two NORMAL pieces, in SentencePiece's merge order."""
    normal = {p.text: i for i, p in enumerate(pieces) if p.type == NORMAL}
    crossing = [t for t in normal if "▁" in t.lstrip("▁")]
    if crossing:  # the word-splitting pre-tokenizer below would be wrong for such pieces
        raise SystemExit(f"pieces with an inner '▁': {crossing[:5]}")
    ranked: list[tuple[float, int, int, str, str]] = []
    for text, piece_id in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                # score desc; on equal scores (whitespace runs) the longer left part first
                ranked.append((-pieces[piece_id].score, -len(left), piece_id, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(model: SpmModel) -> Tokenizer:
    checks = {
        "model_type": (model.model_type, BPE_MODEL_TYPE),
        "byte_fallback": (model.byte_fallback, True),
        "normalizer": (model.normalizer_name, "identity"),
        "add_dummy_prefix": (model.add_dummy_prefix, True),
        "remove_extra_whitespaces": (model.remove_extra_whitespaces, False),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise SystemExit(f"unsupported SentencePiece model: {what}={got!r}, expected {want!r}")
    vocab = {p.text: i for i, p in enumerate(model.pieces)}
    unk = model.pieces[model.unk_id].text
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=bpe_merges(model.pieces),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    # Speed only: no piece holds "▁" after another character (checked in `bpe_merges`), so no
    # merge crosses the start of a "▁*[^▁]+" word; BPE per word (cached) gives the same ids.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+"), behavior="isolated")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = [p.text for p in model.pieces if p.type in (CONTROL, UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user_defined = [p.text for p in model.pieces if p.type == USER_DEFINED]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    return tokenizer


def mistral_common_data() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mistral-common is not installed (pip install -e '.[local]')")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="fail if the files differ")
    args = parser.parse_args(argv)
    stale = []
    for name, filename in SOURCES.items():
        source = mistral_common_data() / filename
        model = read_spm_model(source)
        text = build_tokenizer(model).to_str(pretty=False)
        target = args.out / f"{name}.tokenizer.json"
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(str(target))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        kinds = {k: sum(p.type == k for p in model.pieces) for k in (CONTROL, USER_DEFINED, BYTE)}
        size_mb = len(text.encode()) / 1e6
        print(
            f"{target}: {len(model.pieces)} pieces ({kinds[CONTROL]} control, "
            f"{kinds[USER_DEFINED]} user-defined, {kinds[BYTE]} byte), {size_mb:.1f} MB, "
            f"from {source.name}"
        )
    if stale:
        print("stale: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
