"""The local backend's HTTP API through the official openai SDK against a real uvicorn."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from local_backend.__main__ import main as cli_main
from local_backend.engine import Engine
from local_backend.generation import GenerationRequest
from local_backend.loader import load_service
from local_backend.openai_api import OpenAIService
from local_backend.sampling import SamplingParams
from local_backend.server import create_app

from .engine_fixtures import greedy, tokenizer_fixture  # noqa: F401  (fixture)

MODEL = "wizardlm-2-8x22b"  # a name with a known prompt format (vicuna, v1 tokenizer)
MESSAGES = [{"role": "user", "content": "Name three colours."}]


class ServerThread:
    """uvicorn on 127.0.0.1 with a free port, in a thread, lifespan included."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def service(tiny_model, tokenizer):
    model, config = tiny_model
    engine = Engine(model, tokenizer, config, max_slots=4, max_seq_len=256).start()
    yield OpenAIService(engine, model_name=MODEL)
    engine.stop()


@pytest.fixture(scope="module")
def server(service):
    with ServerThread(create_app(service, stop_engine_on_shutdown=False)) as running:
        yield running


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def engine_text(service, prompt, max_tokens):
    """The engine's own greedy answer, for comparison with what the API returns."""

    async def run():
        return await service.engine.generate(greedy(prompt, max_tokens, ignore_eos=False))

    return asyncio.run(run()).choices[0]


def test_chat_non_stream_matches_engine_and_counts_usage(client, service):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0
    )
    prompt = service.prompts.chat(MESSAGES, None)
    expected = engine_text(service, prompt, 6)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == len(prompt) + len(expected.token_ids)


def test_chat_stream_equals_non_stream_and_ends_with_usage(client):
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert (
        finishes[-1] == whole.choices[0].finish_reason and finishes.count(None) == len(finishes) - 1
    )
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_string_and_token_ids_agree(client, tokenizer):
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt, bos=True)
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=5, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == by_ids.choices[0].text
    assert chunks[-1].choices[0].finish_reason == by_ids.choices[0].finish_reason


def test_n_two_and_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, n=2, seed=5, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in response.choices
    )
    for entry in response.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= 0


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/livez").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["max_slots"] == 4 and ready["accepting"]


def error_body(call):
    """The OpenAI error of a failing SDK call: (exception class, the `error` object)."""
    try:
        call()
    except openai.APIStatusError as exc:
        assert isinstance(exc.body, dict)
        return type(exc), exc.body
    raise AssertionError("the call did not fail")


def test_errors_have_openai_shape_and_status(client, server):
    kind, body = error_body(
        lambda: client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    )
    assert kind is openai.NotFoundError and body["code"] == "model_not_found"
    kind, body = error_body(
        lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3)
    )
    assert kind is openai.BadRequestError and "temperature" in body["message"]
    kind, body = error_body(
        lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
    )
    assert kind is openai.BadRequestError and body["code"] == "context_length_exceeded"
    wizard = [{"role": "wizard", "content": "x"}]
    kind, body = error_body(lambda: client.chat.completions.create(model=MODEL, messages=wizard))
    assert kind is openai.BadRequestError and "role" in body["message"]
    raw = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(server.url + "/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    assert "Traceback" not in raw.text + missing.text


def test_client_disconnect_cancels_generation(server, service):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert service.engine.capacity().active_slots == 1
        cancelled_before = service.engine.stats().requests_cancelled
    wait_for(lambda: service.engine.capacity().active_slots == 0)
    assert service.engine.stats().requests_cancelled == cancelled_before + 1


async def test_queue_full_is_429_and_not_ready_is_503(tiny_model, tokenizer):
    model, config = tiny_model
    engine = Engine(model, tokenizer, config, max_slots=1, max_seq_len=64, queue_size=1)
    app = create_app(OpenAIService(engine, model_name=MODEL))
    waiting = engine.submit(GenerationRequest([1, 2, 3], 2, SamplingParams()))  # never started
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
        full = await http.post("/v1/chat/completions", json=body)
        assert full.status_code == 429 and full.headers["retry-after"]
        assert full.json()["error"]["code"] == "queue_full"
        assert (await http.get("/readyz")).json()["accepting"] is False
    waiting.cancel()

    def never_called():
        raise AssertionError("ASGITransport does not run the lifespan")

    loading = create_app(loader=never_called, model_name=MODEL)  # never loaded
    transport = httpx.ASGITransport(app=loading)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/livez")).status_code == 200
        not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
        chat = await http.post("/v1/chat/completions", json={"model": MODEL})
        assert chat.status_code == 503


def test_background_loading_becomes_ready(service):
    started = threading.Event()

    def loader():
        started.wait(10)
        return service

    app = create_app(loader=loader, model_name=MODEL, stop_engine_on_shutdown=False)
    with ServerThread(app) as running:
        assert httpx.get(running.url + "/readyz").status_code == 503
        started.set()
        wait_for(lambda: httpx.get(running.url + "/readyz").status_code == 200)


async def test_failure_mid_stream_ends_with_error_event_and_no_done(tiny_model, tokenizer):
    model, config = tiny_model
    engine = Engine(model, tokenizer, config, max_slots=1, max_seq_len=64).start()
    real_step, calls = engine._scheduler.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real_step()

    engine._scheduler.step = failing_step  # type: ignore[method-assign]
    app = create_app(OpenAIService(engine, model_name=MODEL))
    body = {"model": MODEL, "prompt": [1, 5, 6], "max_tokens": 20, "stream": True}
    body["ignore_eos"] = True
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            response = await http.post("/v1/completions", json=body)
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["text"] is not None
        assert json.loads(events[-1])["error"]["code"] == "engine_failure"
        assert "[DONE]" not in events and "device lost" not in response.text
    finally:
        engine.stop()


def test_load_service_from_a_model_folder_then_chat(tiny_hf_model_dir):
    # the tiny folder has no tokenizer files: the loader falls back to the v1 file by name
    service = load_service(
        tiny_hf_model_dir, device="cpu", model_name=MODEL, max_slots=2, max_seq_len=128
    )
    try:
        assert service.engine.max_seq_len == 128 and service.prompts.format == "vicuna"
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "ignore_eos": True}
        response = asyncio.run(service.chat(body))
        assert response["usage"]["completion_tokens"] == 3
        assert response["choices"][0]["finish_reason"] == "length"
    finally:
        service.engine.stop()


def test_cli_checks_the_memory_plan_before_loading(tiny_hf_model_dir, capsys):
    folder = str(tiny_hf_model_dir)
    cli_main(["plan", "--model-dir", folder, "--device", "cpu"])
    assert "fits:" in capsys.readouterr().err
    too_big = ["--model-dir", folder, "--device", "cpu", "--max-slots", "1000000"]
    for command in ("plan", "serve"):  # serve exits before loading weights or binding a port
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, *too_big])
        assert exit_info.value.code == 2
        assert "does not fit" in capsys.readouterr().err
