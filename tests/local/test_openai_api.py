"""The in-process OpenAI layer (what the gateway's local provider calls), with a scripted model
so that exact outputs (tool calls, stop strings) are known in advance."""

import asyncio
import dataclasses
import json

import pytest
import torch

from local_backend.config import ModelConfig
from local_backend.engine import Engine
from local_backend.generation import InvalidRequest
from local_backend.openai_api import OpenAIService
from local_backend.tokenizer import Tokenizer

V3_MODEL = "mixtral-8x22b-instruct"
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


class ScriptedModel(torch.nn.Module):
    """Follows the Transformer contract but always predicts the next token of `script`: the
    logits at position p choose script[p - (prompt_len - 1)], then eos."""

    def __init__(self, vocab_size: int, eos_id: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the engine a device and dtype
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.script: list[int] = []
        self.prompt_len = 0

    def forward(self, tokens, positions, cache, slots, last_token_only=False):
        if last_token_only:
            positions = positions.max(dim=1, keepdim=True).values  # [B, 1]
        step = positions - (self.prompt_len - 1)  # [B, T]
        choice = torch.full_like(positions, self.eos_id)
        for i, token in enumerate(self.script):
            choice[step == i] = token
        logits = torch.full((*positions.shape, self.vocab_size), -20.0)
        return logits.scatter_(2, choice.unsqueeze(2), 20.0)  # [B, T, V]


@pytest.fixture(scope="module")
def v3():
    tokenizer = Tokenizer.from_mistral_common("v3")
    config = dataclasses.replace(ModelConfig.from_name("tiny"), vocab_size=tokenizer.vocab_size)
    model = ScriptedModel(tokenizer.vocab_size, tokenizer.eos_id)
    engine = Engine(model, tokenizer, config, max_slots=2, max_seq_len=512).start()
    service = OpenAIService(engine, model_name=V3_MODEL)
    yield service, model, tokenizer
    engine.stop()


def script(v3, messages, tools, ids):
    service, model, _ = v3
    model.prompt_len = len(service.prompts.chat(messages, tools))
    model.script = ids


def tool_call_ids(tokenizer):
    calls = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    return [5, *tokenizer.encode(calls)]  # 5 = [TOOL_CALLS]


async def test_tool_call_answer_becomes_tool_calls(v3):
    service, _, tokenizer = v3
    script(v3, MESSAGES, TOOLS, tool_call_ids(tokenizer))
    body = {"model": V3_MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 60}
    response = await service.chat(body)
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_tool_call_stream_sends_one_tool_calls_delta_and_no_json_text(v3):
    service, _, tokenizer = v3
    script(v3, MESSAGES, TOOLS, tool_call_ids(tokenizer))
    body = {"model": V3_MODEL, "messages": MESSAGES, "tools": TOOLS, "stream": True}
    chunks = [c async for c in await service.chat_stream(body)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert calls[0][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_stop_string_in_chat_and_stream(v3):
    service, _, tokenizer = v3
    script(v3, MESSAGES, None, tokenizer.encode("Sunny and warm, 24 degrees."))
    body = {"model": V3_MODEL, "messages": MESSAGES, "stop": [" warm"]}
    response = await service.chat(body)
    assert response["choices"][0]["message"]["content"] == "Sunny and"
    assert response["choices"][0]["finish_reason"] == "stop"
    chunks = [c async for c in await service.chat_stream({**body, "stream": True})]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Sunny and"
    plain = await service.chat({"model": V3_MODEL, "messages": MESSAGES})
    assert plain["choices"][0]["message"]["content"] == "Sunny and warm, 24 degrees."
    assert plain["choices"][0]["finish_reason"] == "stop"  # the script ends with eos


async def test_completion_logprobs_shape(v3):
    service, model, tokenizer = v3
    prompt = tokenizer.encode("Forecast:", bos=True)
    model.prompt_len, model.script = len(prompt), tokenizer.encode("rain later today")
    body = {"model": V3_MODEL, "prompt": prompt, "max_tokens": 3, "logprobs": 2}
    response = await service.completion(body)
    logprobs = response["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [tokenizer.token_bytes(t).decode() for t in model.script[:3]]
    assert len(logprobs["tokens"]) == response["usage"]["completion_tokens"] == 3
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["token_logprobs"][0] == pytest.approx(0.0, abs=1e-3)  # scripted: certain
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])


async def test_closing_a_stream_early_frees_its_slot(v3):
    service, _, tokenizer = v3
    script(v3, MESSAGES, None, tokenizer.encode("word " * 100))
    cancelled_before = service.engine.stats().requests_cancelled
    chunks = await service.chat_stream({"model": V3_MODEL, "messages": MESSAGES, "stream": True})
    async for chunk in chunks:
        if chunk["choices"][0]["delta"].get("content"):
            break  # generation is running (the first chunk, the role, comes before it)
    await chunks.aclose()  # type: ignore[attr-defined]
    engine = service.engine
    for _ in range(500):
        if engine.capacity().active_slots == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.capacity().active_slots == 0
    assert engine.stats().requests_cancelled == cancelled_before + 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "stop": [str(i) for i in range(17)]}, "stop"),
        ({"messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": [1, 999999]}, "prompt"),
        ({"prompt": ""}, "prompt"),
    ],
)
async def test_invalid_bodies_raise_invalid_request_naming_the_field(v3, body, field):
    service = v3[0]
    call = service.chat if "messages" in body else service.completion
    with pytest.raises(InvalidRequest) as err:
        await call({"model": V3_MODEL, **body})
    assert err.value.status == 400
    assert field in err.value.message or err.value.param == field
    assert service.engine.capacity().queue_depth == 0


async def test_completion_keeps_the_first_space_and_chat_drops_it(v3):
    service, model, tokenizer = v3
    answer = tokenizer.encode("Paris is lovely")
    assert tokenizer.id_to_piece(answer[0]).startswith("▁")
    prompt = tokenizer.encode("The capital of France is", bos=True)
    model.prompt_len, model.script = len(prompt), answer
    completion = await service.completion({"model": V3_MODEL, "prompt": prompt})
    assert completion["choices"][0]["text"] == " Paris is lovely"
    script(v3, MESSAGES, None, answer)
    chat = await service.chat({"model": V3_MODEL, "messages": MESSAGES})
    assert chat["choices"][0]["message"]["content"] == "Paris is lovely"
