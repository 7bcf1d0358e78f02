"""What goes into the engine and what comes out of it: requests, events, usage and errors.

Every error the engine raises for a request carries the HTTP status and the OpenAI error
`type`/`code` it maps to, so the server and the gateway's in-process provider render it the
same way: `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from local_backend.sampling import SamplingParams, TokenLogprob


class EngineError(Exception):
    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_openai(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code}}


class InvalidRequest(EngineError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(EngineError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class QueueFull(EngineError):
    status = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class NotReady(EngineError):
    status = 503
    error_type = "service_unavailable"
    code = "not_ready"


class EngineStopped(NotReady):
    code = "engine_stopped"


class EngineFailure(EngineError):
    """The model step failed; the message is generic so no internals leak to clients."""

    code = "engine_failure"


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)  # stop strings; never part of the output
    stop_token_ids: list[int] = field(default_factory=list)  # finish "stop", besides eos
    ignore_eos: bool = False
    n: int = 1  # sequences sampled from the same prompt (choice indexes 0..n-1)
    # True for raw completions: the output continues the prompt's text, so a first token
    # like "▁Paris" keeps its space. False (chat): the answer starts a new text, and its
    # first SentencePiece space is dropped as decode() would.
    continues_text: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class ChoiceDelta:
    """One step of one choice: the tokens sampled and the text they released."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the choice's last delta


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # counted once, whatever n is
    completion_tokens: int  # summed over the n choices

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChoiceResult:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None


@dataclass
class GenerationResult:
    choices: list[ChoiceResult]
    usage: Usage


@dataclass(frozen=True)
class EngineCapacity:
    max_slots: int
    active_slots: int  # slots held by running sequences
    queue_depth: int  # requests waiting for slots
    queue_size: int  # the most requests that may wait; submit raises QueueFull beyond it

    @property
    def free_slots(self) -> int:
        return self.max_slots - self.active_slots

    @property
    def accepting(self) -> bool:
        return self.queue_depth < self.queue_size


@dataclass
class EngineStats:
    """Counters since the engine was built (a copy is returned by Engine.stats())."""

    steps: int = 0  # scheduler steps run (each one or two forward passes)
    prompt_tokens: int = 0  # of admitted requests, counted once per request
    completion_tokens: int = 0  # tokens sampled, over all sequences
    requests_finished: int = 0
    requests_cancelled: int = 0  # the consumer went away before the end
    requests_failed: int = 0  # a model step failed or the engine stopped under them


class StopStringMatcher:
    """Releases generated text while holding back what could still become a stop string.

    Text is fed in deltas; a stop string may straddle deltas. Only the unreleased tail is
    kept: released text never ends with a proper prefix of a stop string, so a match can only
    start inside the tail.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Add a delta; returns (text safe to release, whether a stop string was reached)."""
        self.pending += delta
        if not self.stops:
            return self.flush(), False
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            released = self.pending[: min(found)]
            self.pending = ""
            return released, True
        hold = self._partial_match_length()
        released = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released

    def _partial_match_length(self) -> int:
        longest = min(max(len(s) for s in self.stops) - 1, len(self.pending))
        for k in range(longest, 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
