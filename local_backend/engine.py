"""The generation engine: an asyncio-facing front over a background batching thread.

    engine = Engine(model, tokenizer, config, max_slots=8, max_seq_len=4096, queue_size=64)
    engine.start()
    stream = engine.submit(GenerationRequest(prompt_tokens=ids, max_tokens=64))  # may raise
    async for delta in stream:        # ChoiceDelta: index, token_ids, text, finish_reason
        ...
    stream.usage                      # Usage, once the stream is exhausted
    engine.stop()

`submit` validates and enqueues synchronously, so a full queue (QueueFull, 429) or a prompt that
does not fit (ContextLengthExceeded, 400) is an exception before any streaming starts. The
model runs on one thread under torch.inference_mode; each step's events reach the consumer's
event loop through call_soon_threadsafe. A consumer that goes away (stream.cancel(), leaving an
`async with`, or dropping the stream) frees its slots at the next step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict, deque
from typing import Any

import torch

from local_backend.engine_stream import GenerationStream, RequestState, StreamItem, deliver_batched
from local_backend.generation import (
    ChoiceDelta,
    ChoiceResult,
    ContextLengthExceeded,
    EngineCapacity,
    EngineError,
    EngineFailure,
    EngineStats,
    EngineStopped,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    QueueFull,
    Usage,
)
from local_backend.kv_cache import KVCache
from local_backend.scheduler import Scheduler
from local_backend.telemetry import EngineTelemetry

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,  # local_backend.tokenizer.Tokenizer
        config: Any,  # local_backend.config.ModelConfig
        max_slots: int = 8,
        max_seq_len: int | None = None,
        queue_size: int = 64,
        prefill_chunk: int = 512,
        prefill_token_budget: int = 2048,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        param = next(model.parameters())
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len or config.max_seq_len
        self.queue_size = queue_size
        self.device = param.device
        self.cache = KVCache(
            config,
            max_slots,
            self.max_seq_len,
            device=param.device,
            dtype=cache_dtype or (param.dtype if param.is_floating_point() else torch.bfloat16),
            kv_heads=getattr(model, "cache_kv_heads", None),  # a rank's share (parallel.py)
        )
        self._scheduler = Scheduler(
            model,
            self.cache,
            make_text_stream=tokenizer.stream_decoder,
            eos_id=tokenizer.eos_id,
            vocab_size=config.vocab_size,
            max_slots=max_slots,
            max_seq_len=self.max_seq_len,
            prefill_chunk=prefill_chunk,
            prefill_token_budget=prefill_token_budget,
        )
        self._cond = threading.Condition()
        self._waiting: deque[RequestState] = deque()
        self._active: list[RequestState] = []
        self._active_slots = 0
        self._stats = EngineStats()
        self.telemetry = EngineTelemetry()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Capture the decode step's CUDA graphs (when the model runs the triton kernels on
        CUDA), then start the engine thread; requests may be submitted before or after."""
        if self._thread is None:
            self._scheduler.warm_up()
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, then fail every queued or running request with 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():  # a step is stuck on the device: leave its state alone
                log.warning("the engine thread did not stop within %.0f s", timeout)
                return
        with self._cond:
            doomed = list(self._waiting) + self._active
            self._stats.requests_failed += len(doomed)
            self._waiting.clear()
            self._active.clear()
            self._scheduler.remove_all()
            self._active_slots = 0
        for state in doomed:
            state.deliver([EngineStopped("the engine was stopped")])

    @property
    def running(self) -> bool:
        return self._thread is not None

    def kv_cache_use(self) -> tuple[int, int]:
        """(tokens cached now, tokens the cache holds): the KV cache's fill."""
        return self._scheduler.cached_tokens, self.max_slots * self.max_seq_len

    def capacity(self) -> EngineCapacity:
        with self._cond:
            return EngineCapacity(
                max_slots=self.max_slots,
                active_slots=self._active_slots,
                queue_depth=len(self._waiting),
                queue_size=self.queue_size,
            )

    def stats(self) -> EngineStats:
        with self._cond:
            return dataclasses.replace(self._stats)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Validate and enqueue; call from the event loop that will consume the stream."""
        self._validate(request)
        stream = GenerationStream(self, request)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(
                    f"the local backend's queue is full ({self.queue_size} requests waiting); "
                    "retry later"
                )
            self._waiting.append(stream._state)
            self._cond.notify_all()
        return stream

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run a request to completion and collect every choice."""
        texts: dict[int, list[str]] = defaultdict(list)
        tokens: dict[int, list[int]] = defaultdict(list)
        logprobs: dict[int, list[Any]] = defaultdict(list)
        finish: dict[int, str] = {}
        async with self.submit(request) as stream:
            async for delta in stream:
                texts[delta.index].append(delta.text)
                tokens[delta.index] += delta.token_ids
                if delta.logprobs:
                    logprobs[delta.index] += delta.logprobs
                if delta.finish_reason:
                    finish[delta.index] = delta.finish_reason
        assert stream.usage is not None
        choices = [
            ChoiceResult(
                index=i,
                text="".join(texts[i]),
                token_ids=tokens[i],
                finish_reason=finish[i],
                logprobs=logprobs[i] if request.sampling.logprobs is not None else None,
            )
            for i in range(request.n)
        ]
        return GenerationResult(choices=choices, usage=stream.usage)

    # -- validation -------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        prompt = request.prompt_tokens
        vocab = self.config.vocab_size
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if any(not 0 <= t < vocab for t in request.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        if request.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if not 1 <= request.n <= self.max_slots:
            raise InvalidRequest(f"n must be in [1, {self.max_slots}]", param="n")
        if len(prompt) + request.max_tokens > self.max_seq_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                f"you requested {len(prompt) + request.max_tokens} tokens ({len(prompt)} in "
                f"the prompt, {request.max_tokens} for the completion). Please reduce the "
                "prompt or max_tokens.",
                param="max_tokens",
            )

    # -- the engine thread ------------------------------------------------------------------

    def _cancel(self, state: RequestState) -> None:
        """The consumer left: a queued request leaves now, a running one before the next step."""
        with self._cond:
            if state.cancelled or (state not in self._waiting and state not in self._active):
                return  # already finished, failed or cancelled
            state.cancelled = True
            if state in self._waiting:
                self._waiting.remove(state)
                self._count_cancel(state, "queued", 0)
            self._cond.notify_all()

    def _count_cancel(self, state: RequestState, where: str, freed: int) -> None:
        self._stats.requests_cancelled += 1
        self.telemetry.record_cancel(where)
        log.info(
            "request %s cancelled while %s: %d slots freed", state.request.request_id, where, freed
        )

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._active):
                        self._cond.wait()
                    if self._stopping:
                        return
                    self._drop_cancelled()
                    self._admit()
                if not self._active:
                    continue
                self._stats.steps += 1
                try:
                    outputs = self._scheduler.step()
                    self.telemetry.record_step(self._scheduler.last_step)
                    self._dispatch(outputs)
                except Exception:  # the thread must survive: fail what ran, keep serving
                    log.exception("engine step failed; aborting the running requests")
                    self._fail_active(EngineFailure("the model step failed; request aborted"))

    def _drop_cancelled(self) -> None:
        for state in [s for s in self._active if s.cancelled]:
            self._active.remove(state)
            freed = self._scheduler.remove(state)
            self._active_slots -= freed
            self._count_cancel(state, "running", freed)

    def _admit(self) -> None:
        # First come, first served: a request waits until all its n sequences fit, and the
        # ones behind it wait too (no starvation of large-n requests).
        while self._waiting and self._waiting[0].request.n <= self._scheduler.free_slots:
            state = self._waiting.popleft()
            self._scheduler.add(state.request, owner=state)
            self._active.append(state)
            self._active_slots += state.request.n
            self._stats.prompt_tokens += len(state.request.prompt_tokens)

    def _dispatch(self, outputs: list[Any]) -> None:
        per_request: dict[RequestState, list[StreamItem]] = defaultdict(list)
        now = time.perf_counter()
        for owner in dict.fromkeys(out.owner for out in outputs):
            if owner.last_token_at is None:
                self.telemetry.record_first_token(now - owner.submitted_at)
            else:
                self.telemetry.record_token_gap(now - owner.last_token_at)
            owner.last_token_at = now
        for out in outputs:
            state: RequestState = out.owner
            per_request[state].append(out.delta)
            state.completion_tokens += len(out.delta.token_ids)
            if out.delta.finish_reason is not None:
                state.unfinished -= 1
        with self._cond:
            self._stats.completion_tokens += sum(len(out.delta.token_ids) for out in outputs)
            for state, items in per_request.items():
                self._active_slots -= sum(
                    1 for d in items if isinstance(d, ChoiceDelta) and d.finish_reason is not None
                )
                if state.unfinished == 0:
                    items.append(Usage(len(state.request.prompt_tokens), state.completion_tokens))
                    self._active.remove(state)
                    self._stats.requests_finished += 1
        deliver_batched(list(per_request.items()))

    def _fail_active(self, error: EngineError) -> None:
        with self._cond:
            failed = list(self._active)
            self._stats.requests_failed += len(failed)
            self._active.clear()
            for state in failed:
                self._scheduler.remove(state)
            self._active_slots = 0
        for state in failed:
            state.deliver([error])
