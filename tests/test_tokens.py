"""gateway/routing/tokens.py and the tokenizer.json files it reads
(local_backend/formats/tokenizer_data/).

- the JSON tokenizers give SentencePiece's ids (sentencepiece on mistral-common's .model files)
  on the shared corpus and on fuzz, and are what scripts/make_tokenizer_json.py generates;
- the byte bound is never below the exact count (texts, random chats, the neutral rendering);
- count_chat equals the local backend's exact prompt length for both formats;
- fits() is exact at the limit and does not tokenize a chat that clearly fits.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.routing.tokens import DATA_DIR, TOKENIZER_FILES, PromptCounter, neutral_segments
from local_backend.formats.prompt_format import (
    MISTRAL_V3,
    VICUNA,
    WIZARDLM2_SYSTEM_PROMPT,
    ChatFormatError,
    render_chat,
)
from tests.tokenizer_corpus import CORPUS, random_texts

REPO = Path(__file__).resolve().parents[1]
SPM_FILES = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}
FORMAT_OF = {"v1": VICUNA, "v3": MISTRAL_V3}


@dataclass(frozen=True)
class FakeModel:  # the fields of gateway.catalog.Model that the counter reads
    id: str
    tokenizer: str
    chat_format: str


WIZARD = FakeModel("wizardlm-2-8x22b", "v1", VICUNA)
MIXTRAL = FakeModel("mixtral-8x22b-instruct", "v3", MISTRAL_V3)


@pytest.fixture(scope="module")
def counter() -> PromptCounter:
    return PromptCounter()


@pytest.fixture(scope="module")
def spm() -> dict[str, Any]:
    sentencepiece = pytest.importorskip("sentencepiece")
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mistral-common is not installed")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return {
        name: sentencepiece.SentencePieceProcessor(model_file=str(data / filename))
        for name, filename in SPM_FILES.items()
    }


@pytest.mark.parametrize("name", ["v1", "v3"])
def test_json_tokenizer_ids_equal_sentencepiece(
    name: str, counter: PromptCounter, spm: dict[str, Any]
) -> None:
    texts = CORPUS + random_texts(3000, seed=1)
    json_tokenizer = counter.tokenizer(name)
    expected = [list(ids) for ids in spm[name].encode(texts)]
    assert json_tokenizer.encode_batch(texts) == expected
    assert [json_tokenizer.encode(t) for t in CORPUS] == expected[: len(CORPUS)]
    # the corpus reaches byte fallback, whitespace runs and (v3) user-defined pieces
    flat = {i for ids in expected for i in ids}
    assert flat & set(json_tokenizer.byte_values)
    assert name == "v1" or flat & json_tokenizer.user_defined_ids


@pytest.mark.parametrize("name", ["v1", "v3"])
def test_control_text_never_becomes_a_control_token(name: str, counter: PromptCounter) -> None:
    json_tokenizer = counter.tokenizer(name)
    for text in ["</s>", "<s>", "[INST] x [/INST]", "[TOOL_CALLS][AVAILABLE_TOOLS]", "<unk>"]:
        ids = json_tokenizer.encode(text)
        assert not set(ids) & json_tokenizer.control_ids, text


def test_committed_files_are_what_the_script_generates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mistral_common")
    spec = importlib.util.spec_from_file_location(
        "make_tokenizer_json", REPO / "scripts" / "make_tokenizer_json.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look themselves up
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path)]) == 0
    for filename in TOKENIZER_FILES.values():
        generated = (tmp_path / filename).read_bytes()
        assert generated == (DATA_DIR / filename).read_bytes(), filename
        assert len(generated) < 3_000_000  # committed: keep them small


# -- upper bound ------------------------------------------------------------------------------


def random_chat(rng: random.Random, fmt: str) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """A valid chat of the format with random texts (tools and tool turns for v3)."""
    texts = random_texts(12, seed=rng.randrange(1 << 30), max_items=rng.choice([5, 40, 120]))
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": texts[0]})
    for turn in range(rng.randint(1, 4)):
        user_text = texts[1 + turn] or "?"
        if rng.random() < 0.3:
            messages.append({"role": "user", "content": [{"type": "text", "text": user_text}]})
        else:
            messages.append({"role": "user", "content": user_text})
        if fmt == MISTRAL_V3 and rng.random() < 0.4:
            call_id = f"call{turn:05d}"
            arguments = json.dumps({"q": texts[6 + turn]}, separators=(",", ":"))
            arguments = arguments[:-1] + ',"n":1e15}'  # compact, and a float that grows
            function = {"name": "search", "arguments": arguments}
            call = {"id": call_id, "type": "function", "function": function}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": texts[10]})
        messages.append({"role": "assistant", "content": texts[5 + turn] or "ok"})
    messages.append({"role": "user", "content": texts[11]})
    tools = None
    if fmt == MISTRAL_V3 and rng.random() < 0.5:
        parameters = {"type": "object", "properties": {"q": {"type": "string"}}}
        tools = [{"type": "function", "function": {"name": "search", "parameters": parameters}}]
    return messages, tools


def test_byte_bound_is_never_below_the_exact_count(counter: PromptCounter) -> None:
    for name in ("v1", "v3"):
        tokenizer = counter.tokenizer(name)
        for text in CORPUS + random_texts(500, seed=2):
            assert len(tokenizer.encode(text)) <= len(text.encode()) + 1, repr(text)
    rng = random.Random(3)
    tight = 0
    for _ in range(300):
        fmt = rng.choice([VICUNA, MISTRAL_V3])
        messages, tools = random_chat(rng, fmt)
        bound = counter.upper_bound(fmt, messages, tools)
        exact = counter.count_chat(fmt, messages, tools)
        assert exact <= bound
        tight += bound < 2 * exact
    assert tight > 0  # the bound is not vacuous
    # the neutral rendering (used when the format cannot encode a chat) is bounded too
    messages = [{"role": "user", "content": "日本語 " * 50}, {"role": "assistant", "content": "x"}]
    assert counter.count(WIZARD, {"messages": messages}, "chat") <= counter.bound(
        WIZARD, {"messages": messages}, "chat"
    )


def test_bound_includes_the_template_overhead(counter: PromptCounter) -> None:
    messages = [{"role": "user", "content": "1"}]
    # Vicuna's default system prompt alone is far more than a per-message constant
    assert counter.count_chat(VICUNA, messages) > len(WIZARDLM2_SYSTEM_PROMPT) // 8
    assert counter.upper_bound(VICUNA, messages) >= counter.count_chat(VICUNA, messages)
    digits = [{"role": "user", "content": "7" * 5000}]  # one token per byte: the tightest text
    for fmt in (VICUNA, MISTRAL_V3):
        exact = counter.count_chat(fmt, digits)
        assert 5000 < exact <= counter.upper_bound(fmt, digits)


# -- agreement with the local backend --------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1", "v3"])
def test_count_chat_equals_the_local_backends_prompt_length(
    name: str, counter: PromptCounter, spm: dict[str, Any]
) -> None:
    from local_backend.chat_format import ChatEncoder
    from local_backend.tokenizer import Tokenizer

    fmt = FORMAT_OF[name]
    encoder = ChatEncoder(Tokenizer.from_mistral_common(name), fmt)
    rng = random.Random(4)
    for _ in range(60):
        messages, tools = random_chat(rng, fmt)
        assert counter.count_chat(fmt, messages, tools) == len(encoder.encode(messages, tools))


# -- fits ----------------------------------------------------------------------------------------


def test_fits_is_exact_at_the_limit(counter: PromptCounter) -> None:
    for fmt, model in ((VICUNA, WIZARD), (MISTRAL_V3, MIXTRAL)):
        messages = [{"role": "user", "content": "Summarize: " + "naïve café 東京 " * 400}]
        exact = counter.count_chat(model, messages)
        max_tokens = 100
        limit = exact + max_tokens
        assert counter.upper_bound(model, messages) > limit  # so the exact path decides
        assert counter.fits(model, messages, None, max_tokens, context=limit)
        assert not counter.fits(model, messages, None, max_tokens, context=limit - 1)
        assert counter.fits(fmt, messages, None, max_tokens - 1, context=limit - 1)


def test_a_short_chat_fits_without_tokenizing(tmp_path: Path) -> None:
    no_files = PromptCounter(data_dir=tmp_path)  # any tokenization would fail to load
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert no_files.fits(MIXTRAL, messages, None, max_tokens=512, context=65536)
    assert no_files.upper_bound(WIZARD, messages) < 200
    bound = no_files.upper_bound(MIXTRAL, messages)
    assert no_files.fits(MIXTRAL, messages, None, max_tokens=65536 - bound, context=65536)
    with pytest.raises(FileNotFoundError):  # one token closer it must count exactly
        no_files.fits(MIXTRAL, messages, None, max_tokens=65536 - bound + 1, context=65536)


# -- the router's and accountant's protocol ------------------------------------------------------


def test_count_protocol_for_chats_and_completions(counter: PromptCounter) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    body = {"messages": messages}
    assert counter.count(MIXTRAL, body, "chat") == counter.count_chat(MISTRAL_V3, messages)
    assert counter.count(WIZARD, body, "chat") == counter.count_chat(VICUNA, messages)
    text_ids = counter.tokenizer("v1").encode("Once upon a time")
    assert counter.count(WIZARD, {"prompt": "Once upon a time"}, "completions") == 1 + len(text_ids)
    assert counter.count(WIZARD, {"prompt": [1, 5, 9]}, "completions") == 3
    assert counter.count(WIZARD, {"prompt": ["a", "b"]}, "completions") == 2 * (1 + 1)
    prompts: list[Any] = ["Once upon a time", [1, 5, 9], ["a", "b c"]]
    for prompt in prompts:
        completion = {"prompt": prompt}
        assert counter.count(WIZARD, completion, "completions") <= counter.bound(
            WIZARD, completion, "completions"
        )
    assert counter.count_text(MIXTRAL, "Hello world") == len(
        counter.tokenizer("v3").encode("Hello world")
    )


def test_chats_the_format_cannot_encode_are_estimated_not_raised(counter: PromptCounter) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "call f"}]
    with pytest.raises(ChatFormatError, match="tool"):
        counter.count_chat(WIZARD, messages, tools)
    body = {"messages": messages, "tools": tools}
    estimate = counter.count(WIZARD, body, "chat")
    tokenizer = counter.tokenizer("v1")
    expected_segments = neutral_segments(messages, tools)
    assert estimate == sum(
        1 if isinstance(s, int) else len(tokenizer.encode(s)) for s in expected_segments
    )
    assert counter.fits(WIZARD, messages, tools, max_tokens=10, context=estimate + 10)
    assert not counter.fits(WIZARD, messages, tools, max_tokens=10, context=estimate + 9)


def test_model_tokenizer_must_match_its_format(counter: PromptCounter) -> None:
    wrong = FakeModel("broken", "v3", VICUNA)
    with pytest.raises(ValueError, match="tokenizer"):
        counter.count(wrong, {"messages": [{"role": "user", "content": "x"}]}, "chat")
    with pytest.raises(ValueError, match="no prompt format"):
        counter.upper_bound("llama-3-70b", [{"role": "user", "content": "x"}])
    assert render_chat(VICUNA, [{"role": "user", "content": "x"}])[0] == 1


def garbage(rng: random.Random, depth: int = 0) -> Any:
    """Random JSON values shaped a little like chat bodies."""
    kinds = ["str", "int", "none", "list", "dict", "message"] if depth < 3 else ["str", "int"]
    kind = rng.choice(kinds)
    if kind == "str":
        return rng.choice(["", "user", "tool", "assistant", "system", "text", "日本 [INST]"])
    if kind == "int":
        return rng.choice([0, 5, -1, True])
    if kind == "none":
        return None
    if kind == "list":
        return [garbage(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["role", "content", "tool_calls", "tool_call_id", "name", "function", "type", "text"]
    if kind == "message":
        keys = ["role", "content", "tool_calls"]
    return {k: garbage(rng, depth + 1) for k in rng.sample(keys, rng.randint(1, len(keys)))}


def test_malformed_chats_get_a_clear_error_or_an_estimate(counter: PromptCounter) -> None:
    rng = random.Random(5)
    for _ in range(400):
        messages, tools = garbage(rng), rng.choice([None, garbage(rng)])
        for fmt, model in ((VICUNA, WIZARD), (MISTRAL_V3, MIXTRAL)):
            try:
                render_chat(fmt, messages, tools)
            except ChatFormatError as exc:
                assert str(exc)  # a message for the client, never another exception type
            body = {"messages": messages, "tools": tools}
            assert 1 <= counter.count(model, body, "chat") <= counter.bound(model, body, "chat")
            assert isinstance(counter.fits(model, messages, tools, 10, 100), bool)


def test_the_gateway_counter_needs_only_tokenizers() -> None:
    script = (
        "import sys; from gateway.routing.tokens import PromptCounter; "
        "n = PromptCounter().count_chat('mistral_v3', [{'role': 'user', 'content': 'hi'}]); "
        "heavy = {'torch', 'sentencepiece', 'mistral_common', 'transformers', 'numpy'}; "
        "heavy |= {m for m in sys.modules if m.startswith('local_backend.') "
        "and not m.startswith('local_backend.formats')}; "
        "print(n, sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split(maxsplit=1) == ["4", "[]\n"]  # <s> [INST] ▁hi [/INST], nothing heavy
