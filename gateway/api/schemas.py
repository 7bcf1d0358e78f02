"""Request validation for /v1/chat/completions and /v1/completions (OpenAI's schema).

Validation only: the handler forwards the client's own dict (so every field, standard or not,
reaches the upstream exactly as sent) after these models have checked the standard fields'
types and ranges once. Strict: "0.7" is not a temperature, true is not a max_tokens. Unknown
fields pass (`extra="allow"`): providers' own parameters (repetition_penalty, top_k, min_p ...)
and OpenRouter's routing fields (`provider`, `models`) which the router reads.

Bounds: every integer field has a ceiling (token budgets and ids fit int32, a seed int64), so a
400-digit max_tokens is the client's 400 naming the field, never arithmetic trouble further on;
floats must be finite (NaN passes every range check otherwise).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gateway.errors import InvalidRequest

INT32_MAX = 2**31 - 1  # token budgets and ids: far above any context, and what upstreams take
NonEmpty = Annotated[str, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenBudget = Annotated[int, Field(ge=1, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


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
    max_tokens: TokenBudget | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    models: list[NonEmpty] | None = None
    provider: dict[str, Any] | None = None
    debug: Debug | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: TokenBudget | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    suffix: str | None = None


_SCHEMAS: dict[str, type[_Sampling]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
}


def _union_tags() -> dict[str, frozenset[str]]:
    """field name -> the tags pydantic puts in an error's loc after it, one per union branch
    ("str", "list[str]", "NamedToolChoice" ...). Learned from pydantic itself, by validating a
    value no branch accepts, so they are exact whatever the annotations become."""
    models: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, Message, Tool]
    models += [FunctionSpec, NamedToolChoice, ResponseFormat, StreamOptions, Debug]
    tags: dict[str, set[str]] = {}
    for model in models:
        for name, info in model.model_fields.items():
            if info.annotation is None:
                continue
            try:
                TypeAdapter(info.annotation).validate_python(object(), strict=True)
            except ValidationError as exc:
                found = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
                if found:
                    tags.setdefault(name, set()).update(found)
    return {name: frozenset(found) for name, found in tags.items()}


_UNION_TAGS = _union_tags()


def _where(loc: tuple[Any, ...]) -> str:
    """pydantic's loc as the client's path: "tools[0].function.strict". A part is dropped only
    when it is a union-branch tag right after the union field itself, never a real name (a
    field "stream", a logit_bias key "str")."""
    out = ""
    previous: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (isinstance(previous, str) and part in _UNION_TAGS.get(previous, ())):
            out += f".{part}" if out else str(part)
        previous = part
    return out


_ROLES = frozenset(Message.model_fields["role"].annotation.__args__)  # type: ignore[union-attr]
_SIMPLE_MESSAGE_FIELDS = frozenset({"role", "content", "name"})


def _plainly_valid(body: dict[str, Any], endpoint: str) -> bool:
    """True when the body is certainly valid by the schemas above: the common shapes (model,
    plain-text messages or a string prompt, stream, max_tokens, user, stream_options) are
    checked here, ~10x cheaper than pydantic; anything else — another field, a list content, a
    value out of place — is left to pydantic (False), which also words the error."""
    for key, value in body.items():
        if key == "model":
            if type(value) is not str or not value:
                return False
        elif key == "messages" and endpoint == "chat":
            if type(value) is not list or not value:
                return False
            for message in value:
                if type(message) is not dict:
                    return False
                role = message.get("role")
                if type(role) is not str or role not in _ROLES:
                    return False
                for name, field in message.items():
                    if name not in _SIMPLE_MESSAGE_FIELDS:
                        return False
                    if name == "content":
                        if field is not None and type(field) is not str:
                            return False
                    elif name == "name" and field is not None and type(field) is not str:
                        return False
        elif key == "prompt" and endpoint == "completions":
            if type(value) is not str:
                return False
        elif key == "stream":
            if value is not None and type(value) is not bool:
                return False
        elif key == "max_tokens":
            if value is not None and (type(value) is not int or not 1 <= value <= INT32_MAX):
                return False
        elif key == "user":
            if value is not None and type(value) is not str:
                return False
        elif key == "stream_options":
            if value is not None and (type(value) is not dict or value.keys() - {"include_usage"}):
                return False
            usage = value.get("include_usage") if value else None
            if usage is not None and type(usage) is not bool:
                return False
        else:
            return False
    return "model" in body and ("messages" in body if endpoint == "chat" else "prompt" in body)


def validate_request(body: dict[str, Any], endpoint: str) -> None:
    """Raise InvalidRequest (400) naming the first bad field; returns nothing on success."""
    if _plainly_valid(body, endpoint):
        return  # (a plain request cannot be a streamed best_of either)
    try:
        _SCHEMAS[endpoint].model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = _where(tuple(first["loc"])) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None
    if endpoint == "completions" and body.get("stream") and (body.get("best_of") or 1) > 1:
        raise InvalidRequest("best_of: cannot be used with stream", param="best_of")
