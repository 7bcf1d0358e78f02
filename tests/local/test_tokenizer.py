"""local_backend/tokenizer.py and detokenize.py against SentencePiece itself.

Both load paths (tokenizer.model via sentencepiece, tokenizer.json via `tokenizers`) must give
SentencePiece's ids; decode must equal SentencePiece's decode on valid text; streamed deltas
must add up to decode and never carry half a character.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from local_backend.formats import TOKENIZER_DATA_DIR as DATA_DIR
from local_backend.formats import TOKENIZER_FILES
from local_backend.tokenizer import MISTRAL_COMMON_FILES, Tokenizer
from tests.tokenizer_corpus import CORPUS, random_texts

sentencepiece = pytest.importorskip("sentencepiece")
VERSIONS = ["v1", "v3"]


@pytest.fixture(scope="module")
def tokenizers() -> dict[tuple[str, str], Tokenizer]:
    """(version, "sentencepiece" | "json") -> Tokenizer."""
    out = {}
    for version in VERSIONS:
        out[version, "sentencepiece"] = Tokenizer.from_mistral_common(version)
        out[version, "json"] = Tokenizer.from_tokenizer_json(DATA_DIR / TOKENIZER_FILES[version])
    return out


@pytest.fixture(scope="module")
def spm(tokenizers: dict[tuple[str, str], Tokenizer]) -> dict[str, Any]:
    return {
        v: sentencepiece.SentencePieceProcessor(model_file=tokenizers[v, "sentencepiece"].source)
        for v in VERSIONS
    }


PATHS = [(v, p) for v in VERSIONS for p in ("sentencepiece", "json")]


@pytest.mark.parametrize(("version", "path"), PATHS)
def test_ids_equal_sentencepiece(
    version: str, path: str, tokenizers: dict[tuple[str, str], Tokenizer], spm: dict[str, Any]
) -> None:
    tokenizer = tokenizers[version, path]
    texts = CORPUS + random_texts(1500, seed=10)
    expected = [list(ids) for ids in spm[version].encode(texts)]
    assert tokenizer.encode_batch(texts) == expected
    assert [tokenizer.encode(t) for t in CORPUS] == expected[: len(CORPUS)]
    assert tokenizer.encode("Hi", bos=True, eos=True) == [1, *spm[version].encode("Hi"), 2]
    assert tokenizer.vocab_size == spm[version].get_piece_size()
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (1, 2, 0)


@pytest.mark.parametrize(("version", "path"), PATHS)
def test_decode_equals_sentencepiece(
    version: str, path: str, tokenizers: dict[tuple[str, str], Tokenizer], spm: dict[str, Any]
) -> None:
    tokenizer, sp = tokenizers[version, path], spm[version]
    for text in CORPUS + random_texts(300, seed=11):
        ids = sp.encode(text)
        assert tokenizer.decode(ids) == sp.decode(ids), repr(text)
        if "▁" not in text:  # SentencePiece writes a literal "▁" back as a space
            assert tokenizer.decode(ids) == text
    # ids as a model may emit them: control tokens, <unk> and BOS anywhere (no byte pieces,
    # whose invalid sequences SentencePiece and Python's UTF-8 decoder replace differently)
    rng = random.Random(12)
    allowed = [i for i in range(tokenizer.vocab_size) if not sp.is_byte(i)]
    for _ in range(300):
        ids = [rng.choice(allowed) for _ in range(rng.randint(0, 12))]
        ids += rng.sample([0, 1, 2, 3], k=rng.randint(0, 2))
        rng.shuffle(ids)
        assert tokenizer.decode(ids) == sp.decode(ids), ids


def test_vocabulary_and_control_tokens(tokenizers: dict[tuple[str, str], Tokenizer]) -> None:
    for path in ("sentencepiece", "json"):
        v3 = tokenizers["v3", path]
        names = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
        names += ["[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
        assert [v3.control_id(n) for n in names] == [3, 4, 5, 6, 7, 8, 9]
        assert v3.id_to_piece(3) == "[INST]" and v3.is_control(4) and not v3.is_control(1000)
        assert not set(v3.encode("[INST] hi [/INST] </s>")) & v3.control_ids
        assert v3.decode([1, 3, *v3.encode("hi"), 4, 2]) == "hi"
        v1 = tokenizers["v1", path]
        assert v1.control_ids == {1, 2} and v1.id_to_piece(3) == "<0x00>"
        with pytest.raises(KeyError):
            v1.control_id("[INST]")
        for bad in (-1, v1.vocab_size):
            with pytest.raises(ValueError, match="outside the vocabulary"):
                v1.decode([bad])


def test_model_dir_prefers_tokenizer_model_then_json(tmp_path: Path) -> None:
    json_only, both, empty = tmp_path / "json", tmp_path / "both", tmp_path / "empty"
    for folder in (json_only, both, empty):
        folder.mkdir()
    shutil.copy(DATA_DIR / TOKENIZER_FILES["v3"], json_only / "tokenizer.json")
    shutil.copy(DATA_DIR / TOKENIZER_FILES["v3"], both / "tokenizer.json")
    source = Tokenizer.from_mistral_common("v3").source
    shutil.copy(source, both / "tokenizer.model")
    assert Tokenizer.from_model_dir(json_only).source.endswith("tokenizer.json")
    assert Tokenizer.from_model_dir(both).source.endswith("tokenizer.model")
    text = "Bonjour, [REFERENCE_DOC_1] le monde 🌍"
    assert Tokenizer.from_model_dir(json_only).encode(text) == Tokenizer.from_model_dir(
        both
    ).encode(text)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.from_model_dir(empty)
    assert Tokenizer.for_model("microsoft/WizardLM-2-8x22B").source.endswith(
        MISTRAL_COMMON_FILES["v1"]
    )
    assert Tokenizer.for_model("mistralai/Mixtral-8x22B-Instruct-v0.1").vocab_size == 32768


# -- streaming ---------------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs: bool) -> list[str]:
    decoder = tokenizer.stream_decoder(**kwargs)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert decoder.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize(("version", "path"), PATHS)
def test_stream_deltas_add_up_to_decode(
    version: str, path: str, tokenizers: dict[tuple[str, str], Tokenizer]
) -> None:
    tokenizer = tokenizers[version, path]
    byte_pieces_seen = 0
    for text in CORPUS + random_texts(300, seed=13):
        ids = tokenizer.encode(text, bos=True)
        byte_pieces_seen += sum(tokenizer.id_to_piece(i).startswith("<0x") for i in ids)
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids) == text.replace("▁", " ")
        # valid text split mid-character never shows a replacement character
        assert all("\ufffd" not in d for d in deltas), repr(text)
    assert byte_pieces_seen > 50  # emoji / rare CJK did go through byte fallback


def test_stream_holds_back_incomplete_characters(
    tokenizers: dict[tuple[str, str], Tokenizer],
) -> None:
    for path in ("sentencepiece", "json"):
        tokenizer = tokenizers["v3", path]
        ids = tokenizer.encode("Hi 🤖!")
        pieces = [tokenizer.id_to_piece(i) for i in ids]
        assert pieces == ["▁Hi", "▁", "<0xF0>", "<0x9F>", "<0xA4>", "<0x96>", "!"]
        assert stream(tokenizer, ids) == ["Hi", " ", "", "", "", "🤖", "!", ""]
        assert stream(tokenizer, ids, strip_leading_space=False)[0] == " Hi"
        # a sequence cut inside a character: the held bytes become one U+FFFD at the end
        assert stream(tokenizer, ids[:4]) == ["Hi", " ", "", "", "\ufffd"]
        assert tokenizer.decode(ids[:4]) == "Hi \ufffd"


def test_stream_of_any_ids_adds_up_to_decode(tokenizers: dict[tuple[str, str], Tokenizer]) -> None:
    tokenizer = tokenizers["v1", "json"]
    rng = random.Random(14)
    byte_ids = list(range(3, 259))
    for _ in range(400):
        # many byte pieces: invalid and truncated UTF-8 must still agree with decode
        pool = byte_ids if rng.random() < 0.7 else range(tokenizer.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 10))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.stream_decoder().push(tokenizer.vocab_size)
