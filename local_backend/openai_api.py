"""OpenAI-shaped chat and completions on top of the Engine: one code path for HTTP and in-process.

    service = OpenAIService(engine, model_name="wizardlm-2-8x22b")
    await service.chat(body)                       # -> chat.completion dict
    chunks = await service.chat_stream(body)       # errors (400/404/429) raise here, before
    async for chunk in chunks: ...                 #   any chunk: chat.completion.chunk dicts
    await service.completion(body) / completion_stream(body)   # legacy /v1/completions
    service.models()                               # -> /v1/models list

The server (server.py) wraps these in HTTP + SSE; the gateway's in-process provider calls them
directly (from any event loop; set body["model"] to `service.model_name`, and read
`service.engine.capacity().accepting` to skip the route while the queue is full). Parsing and
tokenizing run in a worker thread so a long prompt never blocks the event loop.

Errors are EngineError subclasses carrying status and OpenAI type/code. Closing a chunk
iterator early (aclose, or abandoning it) cancels the generation and frees its slots.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from local_backend.engine import Engine, GenerationStream
from local_backend.generation import (
    ChoiceDelta,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    ModelNotFound,
    Usage,
)
from local_backend.openai_schema import ChatBody, CompletionBody, _CommonBody, parse_body
from local_backend.openai_tokens import (
    TOOL_CALLS_ID,
    PromptEncoder,
    chat_logprobs,
    completion_logprobs,
)
from local_backend.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint


class OpenAIService:
    def __init__(
        self,
        engine: Engine,
        model_name: str,
        aliases: tuple[str, ...] = (),
        chat_format: str | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.aliases = tuple(aliases)
        # Model names compare like the gateway's catalog does: without regard to case.
        self.served_names = {name.lower() for name in (model_name, *aliases)}
        self.created = int(time.time())
        self.prompts = PromptEncoder(engine.tokenizer, chat_format or model_name)

    # -- public API --------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        capacity = self.engine.capacity()
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "local",
                    "context_length": self.engine.max_seq_len,
                    "max_slots": capacity.max_slots,
                    "aliases": list(self.aliases),
                }
            ],
        }

    async def chat(self, body: Any) -> dict[str, Any]:
        parsed, request = await asyncio.to_thread(self._chat_request, body)
        result = await self.engine.generate(request)
        return self._chat_response(parsed, request, result)

    async def chat_stream(self, body: Any) -> AsyncIterator[dict[str, Any]]:
        parsed, request = await asyncio.to_thread(self._chat_request, body)
        stream = self.engine.submit(request)
        return self._chat_chunks(parsed, request, stream)

    async def completion(self, body: Any) -> dict[str, Any]:
        parsed, request = await asyncio.to_thread(self._completion_request, body)
        result = await self.engine.generate(request)
        return self._completion_response(parsed, request, result)

    async def completion_stream(self, body: Any) -> AsyncIterator[dict[str, Any]]:
        parsed, request = await asyncio.to_thread(self._completion_request, body)
        stream = self.engine.submit(request)
        return self._completion_chunks(parsed, request, stream)

    # -- requests ----------------------------------------------------------------------------

    def _check_model(self, body: _CommonBody) -> None:
        if body.model.lower() not in self.served_names:
            raise ModelNotFound(
                f"The model {body.model!r} does not exist on this server; it serves "
                f"{self.model_name!r}"
            )

    def _chat_request(self, body: Any) -> tuple[ChatBody, GenerationRequest]:
        parsed = parse_body(ChatBody, body)
        self._check_model(parsed)
        prompt = self.prompts.chat(parsed.messages, parsed.tools)
        max_tokens = parsed.token_limit or max(1, self.engine.max_seq_len - len(prompt))
        return parsed, self._request(parsed, prompt, max_tokens, parsed.logprobs_n)

    def _completion_request(self, body: Any) -> tuple[CompletionBody, GenerationRequest]:
        parsed = parse_body(CompletionBody, body)
        self._check_model(parsed)
        if parsed.echo:
            raise InvalidRequest("echo is not supported by the local backend", "echo")
        if parsed.suffix:
            raise InvalidRequest("suffix is not supported by the local backend", "suffix")
        if parsed.best_of not in (None, parsed.n):
            raise InvalidRequest("best_of is not supported by the local backend", "best_of")
        prompt = self.prompts.completion(parsed.single_prompt())
        max_tokens = parsed.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        request = self._request(parsed, prompt, max_tokens, parsed.logprobs)
        request.continues_text = True
        return parsed, request

    def _request(
        self, body: _CommonBody, prompt: list[int], max_tokens: int, logprobs: int | None
    ) -> GenerationRequest:
        top_k = body.top_k if body.top_k and body.top_k > 0 else 0
        try:
            sampling = SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=top_k,
                seed=body.seed,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0,
                logprobs=logprobs,
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return GenerationRequest(
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=body.stop_list(),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            n=body.n,
            request_id=uuid.uuid4().hex,
        )

    # -- responses ---------------------------------------------------------------------------

    def _envelope(self, prefix: str, request: GenerationRequest, kind: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{request.request_id}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
        }

    def _chat_response(
        self, body: ChatBody, request: GenerationRequest, result: GenerationResult
    ) -> dict[str, Any]:
        choices = []
        for choice in result.choices:
            logprobs = None
            if choice.logprobs is not None:
                logprobs = {"content": chat_logprobs(self.prompts.tokenizer, choice.logprobs)}
            message: dict[str, Any] = {"role": "assistant", "content": choice.text}
            finish_reason = choice.finish_reason
            tool_message = self.prompts.tool_message(choice.token_ids)
            if tool_message is not None:
                message, finish_reason = tool_message, "tool_calls"
            choices.append(
                {
                    "index": choice.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            )
        return {
            **self._envelope("chatcmpl", request, "chat.completion"),
            "choices": choices,
            "usage": _usage(result.usage),
        }

    def _completion_response(
        self, body: CompletionBody, request: GenerationRequest, result: GenerationResult
    ) -> dict[str, Any]:
        choices = []
        for choice in result.choices:
            logprobs = None
            if choice.logprobs is not None:
                logprobs = completion_logprobs(self.prompts.tokenizer, choice.logprobs)
            choices.append(
                {
                    "index": choice.index,
                    "text": choice.text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
            )
        return {
            **self._envelope("cmpl", request, "text_completion"),
            "choices": choices,
            "usage": _usage(result.usage),
        }

    async def _chat_chunks(
        self, body: ChatBody, request: GenerationRequest, stream: GenerationStream
    ) -> AsyncIterator[dict[str, Any]]:
        envelope = self._envelope("chatcmpl", request, "chat.completion.chunk")
        extra = {"usage": None} if body.include_usage else {}

        def chunk(index: int, delta: dict[str, Any], **fields: Any) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            return {**envelope, "choices": [{**choice, **fields}], **extra}

        # A v3 answer that writes [TOOL_CALLS] is held back from that token on and sent as
        # one tool_calls delta at its end (or as text, if the calls cannot be read).
        generated: dict[int, list[int]] = {i: [] for i in range(request.n)}
        held: dict[int, list[str]] = {i: [] for i in range(request.n)}
        async with stream:
            for index in range(request.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for delta in stream:
                ids = generated[delta.index]
                ids += delta.token_ids
                if self.prompts.uses_tool_calls() and TOOL_CALLS_ID in ids:
                    held[delta.index].append(delta.text)
                    if delta.finish_reason:
                        for out in self._tool_call_chunks(delta, ids, held[delta.index]):
                            yield chunk(delta.index, out[0], finish_reason=out[1])
                    continue
                if delta.text or (delta.logprobs and body.logprobs):
                    logprobs = None
                    if body.logprobs and delta.logprobs:
                        content = chat_logprobs(self.prompts.tokenizer, delta.logprobs)
                        logprobs = {"content": content}
                    yield chunk(delta.index, {"content": delta.text}, logprobs=logprobs)
                if delta.finish_reason:
                    yield chunk(delta.index, {}, finish_reason=delta.finish_reason)
        if body.include_usage and stream.usage is not None:
            yield {**envelope, "choices": [], "usage": _usage(stream.usage)}

    def _tool_call_chunks(
        self, last: ChoiceDelta, generated: list[int], held_text: list[str]
    ) -> list[tuple[dict[str, Any], str | None]]:
        """(delta, finish_reason) pairs that end a choice whose output was held back."""
        message = self.prompts.tool_message(generated)
        if message is None:  # unreadable calls: the text as it was written
            return [({"content": "".join(held_text)}, None), ({}, last.finish_reason)]
        calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        return [({"tool_calls": calls}, None), ({}, "tool_calls")]

    async def _completion_chunks(
        self, body: CompletionBody, request: GenerationRequest, stream: GenerationStream
    ) -> AsyncIterator[dict[str, Any]]:
        envelope = self._envelope("cmpl", request, "text_completion")
        extra = {"usage": None} if body.include_usage else {}
        async with stream:
            async for delta in stream:
                if not (delta.text or delta.finish_reason or delta.logprobs):
                    continue
                yield {
                    **envelope,
                    "choices": [_completion_choice(self.prompts.tokenizer, delta)],
                    **extra,
                }
        if body.include_usage and stream.usage is not None:
            yield {**envelope, "choices": [], "usage": _usage(stream.usage)}


def _completion_choice(tokenizer: Any, delta: ChoiceDelta) -> dict[str, Any]:
    logprobs = completion_logprobs(tokenizer, delta.logprobs) if delta.logprobs else None
    return {
        "index": delta.index,
        "text": delta.text,
        "logprobs": logprobs,
        "finish_reason": delta.finish_reason,
    }


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
