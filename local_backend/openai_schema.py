"""Validation of OpenAI request bodies (chat and legacy completions) for the local backend.

Unknown fields are ignored, as OpenAI-compatible servers do. Besides OpenAI's fields, the
common extensions of vLLM / OpenRouter are accepted: top_k, repetition_penalty,
stop_token_ids, ignore_eos. Validation failures become InvalidRequest (HTTP 400) naming the
field.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from local_backend.generation import InvalidRequest
from local_backend.sampling import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _CommonBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    user: str | None = None
    # extensions
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0 = off (vLLM uses -1)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop accepts at most {MAX_STOP_STRINGS} strings", "stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatBody(_CommonBody):
    messages: list[dict[str, Any]] = Field(min_length=1)  # checked by the chat encoder
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(_CommonBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (batched prompts are not supported)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidRequest("only one prompt per request is supported", "prompt")
            prompt = prompt[0]  # type: ignore[assignment]
        if not prompt:
            raise InvalidRequest("prompt must not be empty", "prompt")
        return prompt  # type: ignore[return-value]


BodyT = TypeVar("BodyT", bound=BaseModel)


def parse_body(kind: type[BodyT], body: Any) -> BodyT:
    """Validate a decoded JSON body; InvalidRequest names the first offending field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{field}: {first['msg']}", param=field) from None
