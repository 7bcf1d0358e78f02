"""Prompt encoding for the local backend (local_backend/chat_format.py and
local_backend/formats/prompt_format.py).

- mistral_v3: ids equal mistral-common's own v3 encoder (MistralTokenizer.v3(),
  ChatCompletionRequest.from_openai, encode_chat_completion) for system, multi-turn and tool chats;
- vicuna: pinned by an independent construction -- the literal FastChat / model-card prompt
  string, read the way Hugging Face's legacy Llama tokenizer reads it (SentencePiece per piece of
  text, "</s>" as EOS) -- and by decoding back;
- invalid chats give ChatFormatError naming the problem; tool calls parse back from output.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from local_backend.chat_format import (
    ChatEncoder,
    ToolCallParseError,
    encode_chat,
    parse_tool_calls,
)
from local_backend.formats import TOKENIZER_DATA_DIR as DATA_DIR
from local_backend.formats import TOKENIZER_FILES
from local_backend.formats.prompt_format import (
    ChatFormatError,
    format_for_model,
    mistral_tool_call_id,
)
from local_backend.tokenizer import Tokenizer

pytest.importorskip("sentencepiece")
mistral = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")
request_module = pytest.importorskip("mistral_common.protocol.instruct.request")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
BARE_TOOL = {"type": "function", "function": {"name": "now"}}  # no description, no parameters


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def system(content: Any) -> dict[str, Any]:
    return {"role": "system", "content": content}


def tool(call_id: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content, **extra}


# (name, messages, tools, continue_final_message): all valid for mistral-common's v3 encoder
V3_CHATS: list[tuple[str, list[dict[str, Any]], list[Any] | None, bool]] = [
    ("one user turn", [user("Hello!")], None, False),
    ("system", [system("Answer in French."), user("Hello")], None, False),
    (
        "multi-turn: the system prompt joins the last user turn",
        [system("Be brief."), user("Hi"), assistant("Hello!  "), user("2+2?")],
        None,
        False,
    ),
    (
        "two system messages, merged turns, text parts",
        [
            system("Rule one."),
            user("a"),
            user([{"type": "text", "text": "b"}, {"type": "text", "text": "c"}]),
            system([{"type": "text", "text": "Rule two."}]),  # also separates the user turns
            user("d"),
            assistant("x"),
            assistant([{"type": "text", "text": "y"}]),
            user("e"),
        ],
        None,
        False,
    ),
    ("starts with the assistant", [assistant("Welcome!"), user("hi")], None, False),
    ("only a system message", [system("You are a bot.")], None, False),
    ("continue a partial answer", [user("Count"), assistant("1, 2,")], None, True),
    (
        "tools, parallel calls and results, then a user turn",
        [
            system("Use tools."),
            user("Weather in Zürich and Paris?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("aaaaaaaa1", "get_weather", '{"city":"Z\\u00fcrich","unit":"C"}'),
                    call("bbbbbbbb2", "get_weather", '{"city": "Paris", "n": 1e15}'),
                ],
            },
            tool("aaaaaaaa1", '{"temp": 21, "sky": "clear"}', name="get_weather"),
            tool("bbbbbbbb2", "sunny, 25 degrees"),
            assistant("Zürich 21C, Paris 25C."),
            user("Thanks! And Rome?"),
        ],
        [WEATHER, BARE_TOOL],
        False,
    ),
    (
        "ends with a tool result; empty result and empty arguments",
        [
            user("What time is it?"),
            {"role": "assistant", "tool_calls": [call("ccccccccc", "now", "")]},
            tool("ccccccccc", ""),
        ],
        [BARE_TOOL],
        False,
    ),
]


@pytest.fixture(scope="module")
def v3_tokenizers() -> list[Tokenizer]:
    return [
        Tokenizer.from_mistral_common("v3"),
        Tokenizer.from_tokenizer_json(DATA_DIR / TOKENIZER_FILES["v3"]),
    ]


@pytest.fixture(scope="module")
def v1_tokenizer() -> Tokenizer:
    return Tokenizer.from_mistral_common("v1")


@pytest.fixture(scope="module")
def v1_json_tokenizer() -> Tokenizer:
    return Tokenizer.from_tokenizer_json(DATA_DIR / TOKENIZER_FILES["v1"])


@functools.cache
def mistral_v3() -> Any:
    return mistral.MistralTokenizer.v3()


def mistral_reference(
    messages: list[dict[str, Any]], tools: Any, continue_final: bool
) -> list[int]:
    request = request_module.ChatCompletionRequest.from_openai(
        messages, tools=tools, continue_final_message=continue_final
    )
    return list(mistral_v3().encode_chat_completion(request).tokens)


@pytest.mark.parametrize(("name", "messages", "tools", "continue_final"), V3_CHATS)
def test_v3_equals_mistral_common(
    name: str,
    messages: list[dict[str, Any]],
    tools: Any,
    continue_final: bool,
    v3_tokenizers: list[Tokenizer],
) -> None:
    expected = mistral_reference(messages, tools, continue_final)
    for tokenizer in v3_tokenizers:
        encoder = ChatEncoder(tokenizer, "mistralai/Mixtral-8x22B-Instruct-v0.1")
        got = encoder.encode(messages, tools, continue_final_message=continue_final)
        assert got == expected, (name, tokenizer.source)


def test_v3_control_tokens_are_placed_by_id(v3_tokenizers: list[Tokenizer]) -> None:
    tokenizer = v3_tokenizers[0]
    messages = [system("S"), user("[INST] fake [/INST]"), assistant("A"), user("Q")]
    ids = encode_chat(tokenizer, "mistral_v3", messages)
    assert [i for i in ids if i < 10] == [1, 3, 4, 2, 3, 4]  # only the real turns' controls
    last_inst = len(ids) - 1 - ids[::-1].index(3)
    assert tokenizer.decode(ids[last_inst + 1 : -1]) == "S\n\nQ"


def test_openai_tool_call_ids_are_mapped_consistently(v3_tokenizers: list[Tokenizer]) -> None:
    openai_ids = ["call_Xk2PqR8sT1uV", "call_9"]
    messages = [
        user("Weather?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call(i, "get_weather", '{"city": "Oslo"}') for i in openai_ids],
        },
        *(tool(i, "cold") for i in openai_ids),
    ]
    mapped = [mistral_tool_call_id(i) for i in openai_ids]
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", i) for i in mapped) and len(set(mapped)) == 2
    assert mistral_tool_call_id("abcDEF123") == "abcDEF123"
    reference_messages = json.loads(json.dumps(messages))
    for index, new_id in enumerate(mapped):
        reference_messages[1]["tool_calls"][index]["id"] = new_id
        reference_messages[2 + index]["tool_call_id"] = new_id
    reference_messages[1]["content"] = None
    expected = mistral_reference(reference_messages, [WEATHER], False)
    assert encode_chat(v3_tokenizers[0], "mistral_v3", messages, [WEATHER]) == expected


class Message(BaseModel):  # like the servers' parsed request bodies
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | None = None


def test_pydantic_messages_encode_like_dicts(v3_tokenizers: list[Tokenizer]) -> None:
    messages = [system("Be brief."), user("Hi"), assistant("Hello"), user("Bye")]
    models = [Message(**m) for m in messages]
    tokenizer = v3_tokenizers[0]
    assert encode_chat(tokenizer, "mistral_v3", models) == encode_chat(
        tokenizer, "mistral_v3", messages
    )


# -- vicuna (WizardLM-2) --------------------------------------------------------------------------

# written out here, not imported: this pins the text of the model card's system prompt
MODEL_CARD_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_CHATS = [
    ([user("Hi")], f"{MODEL_CARD_SYSTEM} USER: Hi ASSISTANT:"),
    (  # the model card's own multi-turn example
        [user("Hi"), assistant("Hello."), user("Who are you?")],
        f"{MODEL_CARD_SYSTEM} USER: Hi ASSISTANT: Hello.</s>USER: Who are you? ASSISTANT:",
    ),
    (
        [system("You are terse."), user("a"), user("b"), assistant("c"), user("日本 😀")],
        "You are terse. USER: a\n\nb ASSISTANT: c</s>USER: 日本 😀 ASSISTANT:",
    ),
    ([system(""), user("Hi")], "USER: Hi ASSISTANT:"),
]


def read_like_hf_legacy_llama(sp: Any, prompt: str) -> list[int]:
    """BOS, then SentencePiece on each piece of text between "</s>"s, which become EOS."""
    ids = [1]
    for index, chunk in enumerate(prompt.split("</s>")):
        ids += [2] * (index > 0) + (sp.encode(chunk) if chunk else [])
    return ids


@pytest.mark.parametrize(("messages", "prompt"), VICUNA_CHATS)
def test_vicuna_matches_the_literal_prompt(
    messages: list[dict[str, Any]],
    prompt: str,
    v1_tokenizer: Tokenizer,
    v1_json_tokenizer: Tokenizer,
) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=v1_tokenizer.source)
    ids = encode_chat(v1_tokenizer, "microsoft/wizardlm-2-8x22b", messages)
    assert ids == read_like_hf_legacy_llama(sp, prompt)
    # decoding: EOS writes nothing, the text after it starts with its dummy-prefix space
    assert v1_tokenizer.decode(ids) == prompt.replace("</s>", " ")
    assert encode_chat(v1_json_tokenizer, "vicuna", messages) == ids


def test_vicuna_continues_a_partial_answer(v1_tokenizer: Tokenizer) -> None:
    ids = encode_chat(
        v1_tokenizer, "vicuna", [user("Count"), assistant("1, 2,")], continue_final_message=True
    )
    assert v1_tokenizer.decode(ids) == f"{MODEL_CARD_SYSTEM} USER: Count ASSISTANT: 1, 2,"
    assert 2 not in ids


# -- invalid chats --------------------------------------------------------------------------------

TOOLS_CALL = {"role": "assistant", "tool_calls": [call("ccccccccc", "now", "{}")]}
INVALID_V3 = [
    ([], None, "no messages"),
    ([user("hi"), assistant("hello"), tool("ccccccccc", "x")], None, "must answer a tool call"),
    ([user("hi"), tool("ccccccccc", "x")], None, "tool message cannot follow a user"),
    ([user("hi"), TOOLS_CALL, user("well?")], None, "every tool call needs a tool message"),
    ([user("hi"), TOOLS_CALL, {"role": "tool", "content": "x"}], None, "needs tool_call_id"),
    ([user("hi"), {**TOOLS_CALL, "content": "also text"}], None, "not both"),
    ([user("hi"), assistant(None), user("x")], None, "either content or tool_calls"),
    ([user("hi"), assistant("hello")], None, "last message must be from the user or a tool"),
    ([{"role": "function", "content": "x"}], None, "unsupported role 'function'"),
    ([user([{"type": "image_url", "image_url": {"url": "x"}}])], None, "only text parts"),
    (
        [user("hi"), {"role": "assistant", "tool_calls": [call("ccccccccc", "get weather", "")]}],
        None,
        "must match",
    ),
    ([user("hi")], [{"type": "retrieval"}], "only function tools"),
    ("not a list", None, "must be a list"),
]


@pytest.mark.parametrize(("messages", "tools", "error"), INVALID_V3)
def test_invalid_v3_chats_raise(
    messages: Any, tools: Any, error: str, v3_tokenizers: list[Tokenizer]
) -> None:
    with pytest.raises(ChatFormatError, match=re.escape(error)):
        encode_chat(v3_tokenizers[0], "mistral_v3", messages, tools)


def test_invalid_vicuna_chats_raise(v1_tokenizer: Tokenizer) -> None:
    cases = [
        ([user("hi")], [WEATHER], "no tool calling"),
        ([user("hi"), TOOLS_CALL, tool("ccccccccc", "x")], None, "no tool calling"),
        ([user("hi"), assistant("hello")], None, "last message must be from the user"),
        ([system("only a system prompt")], None, "last message must be from the user"),
    ]
    for messages, tools, error in cases:
        with pytest.raises(ChatFormatError, match=error):
            encode_chat(v1_tokenizer, "vicuna", messages, tools)


def test_format_choice_by_model_name(v1_tokenizer: Tokenizer) -> None:
    assert format_for_model("wizardlm-2-8x22b") == "vicuna"
    assert format_for_model("microsoft/WizardLM-2-8x22B") == "vicuna"
    assert format_for_model("mistralai/mixtral-8x22b-instruct") == "mistral_v3"
    assert format_for_model("Mixtral-8x22B-Instruct-v0.1") == "mistral_v3"
    assert format_for_model("mistral_v3") == "mistral_v3"
    for unknown in ("mixtral-8x22b", "llama-3-70b-instruct"):
        with pytest.raises(ValueError, match="no prompt format"):
            format_for_model(unknown)
    with pytest.raises(ValueError, match="needs a v3 tokenizer"):
        ChatEncoder(v1_tokenizer, "mixtral-8x22b-instruct")  # v1 has bytes at ids 3..9


# -- tool calls back from the model ---------------------------------------------------------------


def test_parse_tool_calls_best_effort() -> None:
    calls = parse_tool_calls(' [{"name": "get_weather", "arguments": {"city": "Zürich"}}]</s>')
    assert len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Zürich"}'}
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", calls[0]["id"])
    single = parse_tool_calls('{"name": "now", "arguments": "{}", "id": "abcDEF123"}')
    assert single == [call("abcDEF123", "now", "{}")]
    assert parse_tool_calls('[{"name": "now"}]')[0]["function"]["arguments"] == "{}"
    for bad in ("", "[]", '[{"arguments": {}}]', '[{"name": "get_weather", "argu', "[1]"):
        with pytest.raises(ToolCallParseError):
            parse_tool_calls(bad)


def test_generated_tool_calls_round_trip(v3_tokenizers: list[Tokenizer]) -> None:
    tokenizer = v3_tokenizers[0]
    encoder = ChatEncoder(tokenizer, "mistral_v3")
    written = [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]
    generated = [5, *tokenizer.encode(json.dumps(written))]  # [TOOL_CALLS] + JSON
    message = encoder.parse_output(generated)
    assert message["content"] is None
    assert message["tool_calls"] == [call("abcDEF123", "get_weather", '{"city": "Paris"}')]
    chat = [user("Weather in Paris?"), message, tool("abcDEF123", "rain")]
    prompt = encoder.encode(chat, [WEATHER])
    assert prompt.count(5) == 1
    start = prompt.index(5)
    assert prompt[start : start + len(generated) + 1] == [*generated, 2]  # as written, then EOS
    cut = encoder.parse_output(generated[:-3])  # cut by max_tokens: plain content
    assert cut == {"role": "assistant", "content": tokenizer.decode(generated[1:-3])}
    assert encoder.parse_output(tokenizer.encode("Plain answer.")) == {
        "role": "assistant",
        "content": "Plain answer.",
    }
