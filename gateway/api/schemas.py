"""Request validation for /v1/chat/completions and /v1/completions (OpenAI's schema).

Validation only: the handler forwards the client's own dict (so every field, standard or not,
reaches the upstream exactly as sent) after these models have checked the standard fields'
types and ranges once. Strict: "0.7" is not a temperature, true is not a max_tokens. Unknown
fields pass (`extra="allow"`): providers' own parameters (repetition_penalty, top_k, min_p ...)
and OpenRouter's routing fields (`provider`, `models`) which the router reads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest

NonEmpty = Annotated[str, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionSpec(_Open):
    name: NonEmpty
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: dict[str, Any]


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


class Debug(_Open):
    attempts: bool = False


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(_Open):
    model: NonEmpty
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    models: list[NonEmpty] | None = None
    provider: dict[str, Any] | None = None
    debug: Debug | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    suffix: str | None = None


_SCHEMAS: dict[str, type[_Sampling]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
}


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "str", "list[", "dict[", "int", "float")):
            out += f".{part}" if out else str(part)  # skip pydantic's union-branch names
    return out


def validate_request(body: dict[str, Any], endpoint: str) -> None:
    """Raise InvalidRequest (400) naming the first bad field; returns nothing on success."""
    try:
        _SCHEMAS[endpoint].model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = _where(tuple(first["loc"])) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None
    if endpoint == "completions" and body.get("stream") and (body.get("best_of") or 1) > 1:
        raise InvalidRequest("best_of: cannot be used with stream", param="best_of")
