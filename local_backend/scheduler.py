"""Continuous batching, one synchronous step at a time (the engine's thread drives it).

A step runs up to two forward passes:

1. prefill: sequences whose prompt is not yet fully in their KV cache slot get their next
   chunk (at most `prefill_chunk` tokens each, at most `prefill_token_budget` padded tokens
   in all). Ragged chunks are right-padded with position -1, which the model neither writes
   to the cache nor attends to. A sequence whose prompt completes samples its first token
   from the logits of its last prompt position.
2. decode: every sequence that has a sampled token not yet in the cache feeds it (T = 1),
   through a DecodeRunner: kernels.decode_step replayed from a CUDA graph per batch bucket
   when the model has the triton backend, else the model's forward (decode_runner.py).

Sequences join (`add`) and leave (`remove`, or by finishing) between steps, each in its own
slot, so a sequence's tokens never depend on its batch mates beyond float rounding.

Legend for shape comments: B = rows in the forward pass, T = tokens per row, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from local_backend.decode_runner import DecodeRunner
from local_backend.generation import ChoiceDelta, GenerationRequest, StopStringMatcher
from local_backend.sampling import SamplingState, TokenLogprob, sample


class TextStream(Protocol):
    """Turns token ids into text deltas (holding back incomplete UTF-8 / word pieces)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass
class Sequence:
    owner: Hashable  # the request this sequence belongs to (n sequences share one owner)
    index: int  # choice index within the request
    slot: int  # KV cache slot
    tokens: list[int]  # prompt + generated
    prompt_len: int
    max_tokens: int
    sampling: SamplingState
    text: TextStream
    stop: StopStringMatcher
    stop_token_ids: frozenset[int]
    num_cached: int = 0  # leading tokens whose keys/values are in the cache
    generated: int = 0
    finish_reason: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prompt_len


@dataclass
class StepTiming:
    """What the last step ran: prefill tokens and decode rows, and the seconds each took."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_batch: int = 0
    decode_s: float = 0.0


@dataclass
class StepOutput:
    owner: Hashable
    delta: ChoiceDelta


class Scheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: Any,  # local_backend.kv_cache.KVCache
        make_text_stream: Any,  # (strip_leading_space: bool) -> TextStream
        eos_id: int,
        vocab_size: int,
        max_slots: int,
        max_seq_len: int,
        prefill_chunk: int = 512,
        prefill_token_budget: int = 2048,
    ) -> None:
        self.model = model
        self.cache = cache
        self.make_text_stream = make_text_stream
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.prefill_token_budget = max(prefill_token_budget, prefill_chunk)
        self.device = next(model.parameters()).device
        self.decode_runner = DecodeRunner(model, cache, max_slots)
        self.sequences: list[Sequence] = []
        self.last_step = StepTiming()

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self.sequences)

    @property
    def has_work(self) -> bool:
        return bool(self.sequences)

    def add(self, request: GenerationRequest, owner: Hashable) -> None:
        """Give each of the request's n sequences a slot (caller checks free_slots first)."""
        assert request.n <= self.free_slots, "admit only what fits"
        stop_ids = set(request.stop_token_ids)
        if not request.ignore_eos:
            stop_ids.add(self.eos_id)
        for index in range(request.n):
            params = request.sampling
            if params.seed is not None and index > 0:
                # choice 0 reproduces an n=1 request with the same seed; the others differ
                params = dataclasses.replace(params, seed=params.seed + index)
            self.sequences.append(
                Sequence(
                    owner=owner,
                    index=index,
                    slot=self.cache.allocate(),
                    tokens=list(request.prompt_tokens),
                    prompt_len=len(request.prompt_tokens),
                    max_tokens=request.max_tokens,
                    sampling=SamplingState(
                        params, request.prompt_tokens, self.vocab_size, self.device
                    ),
                    text=self.make_text_stream(strip_leading_space=not request.continues_text),
                    stop=StopStringMatcher(request.stop),
                    stop_token_ids=frozenset(stop_ids),
                )
            )

    def remove(self, owner: Hashable) -> int:
        """Drop every sequence of `owner` (cancellation); returns how many slots were freed."""
        leaving = [s for s in self.sequences if s.owner == owner]
        for seq in leaving:
            self._release(seq)
        return len(leaving)

    def remove_all(self) -> list[Hashable]:
        owners = list(dict.fromkeys(s.owner for s in self.sequences))
        for seq in list(self.sequences):
            self._release(seq)
        return owners

    def warm_up(self) -> None:
        """Capture the decode step's CUDA graphs before the first request (see DecodeRunner)."""
        self.decode_runner.warm_up()

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys and values are in the KV cache now (for its use gauge)."""
        return sum(s.num_cached for s in self.sequences)

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self.last_step = StepTiming()
        prefill = self._prefill_rows()
        if prefill:
            started = time.perf_counter()
            outputs += self._prefill(prefill)  # sampling syncs the device: the time is real
            self.last_step.prefill_tokens = sum(chunk for _, chunk in prefill)
            self.last_step.prefill_s = time.perf_counter() - started
        decode = [s for s in self.sequences if not s.prefilling and s.finish_reason is None]
        if decode:
            started = time.perf_counter()
            outputs += self._decode(decode)
            self.last_step.decode_batch = len(decode)
            self.last_step.decode_s = time.perf_counter() - started
        return outputs

    # -- forward passes -----------------------------------------------------------------------

    def _prefill_rows(self) -> list[tuple[Sequence, int]]:
        """(sequence, chunk length) pairs for this step's prefill, within the token budget."""
        rows: list[tuple[Sequence, int]] = []
        longest = 0
        for seq in self.sequences:
            if not seq.prefilling:
                continue
            chunk = min(self.prefill_chunk, seq.prompt_len - seq.num_cached)
            if rows and (len(rows) + 1) * max(longest, chunk) > self.prefill_token_budget:
                break
            rows.append((seq, chunk))
            longest = max(longest, chunk)
        return rows

    def _prefill(self, rows: list[tuple[Sequence, int]]) -> list[StepOutput]:
        width = max(chunk for _, chunk in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)  # [B, T]
        positions = torch.full((len(rows), width), -1, dtype=torch.long)  # [B, T]; -1 = padding
        for b, (seq, chunk) in enumerate(rows):
            start = seq.num_cached
            tokens[b, :chunk] = torch.tensor(seq.tokens[start : start + chunk])
            positions[b, :chunk] = torch.arange(start, start + chunk)
        # Only each row's last chunk token can yield a first sampled token: ask the model for
        # those logits alone instead of materialising [B, T, V].
        slots = torch.tensor([s.slot for s, _ in rows], dtype=torch.long, device=self.device)
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        logits = self.model(tokens, positions, self.cache, slots, last_token_only=True)  # [B, 1, V]
        done: list[int] = []
        for b, (seq, chunk) in enumerate(rows):
            seq.num_cached += chunk
            if not seq.prefilling:
                done.append(b)
        if not done:
            return []
        final_logits = logits[torch.tensor(done, device=logits.device), -1]  # [B_done, V]
        return self._sample_and_emit(final_logits, [rows[b][0] for b in done])

    def _decode(self, seqs: list[Sequence]) -> list[StepOutput]:
        logits = self.decode_runner(
            [s.tokens[-1] for s in seqs], [s.num_cached for s in seqs], [s.slot for s in seqs]
        )  # [B, V]
        for seq in seqs:
            seq.num_cached += 1
        return self._sample_and_emit(logits, seqs, self.decode_runner.greedy_tokens)

    # -- sampling, text and stopping ------------------------------------------------------------

    def _sample_and_emit(
        self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None
    ) -> list[StepOutput]:
        token_ids, logprobs = sample(logits, [s.sampling for s in seqs], greedy)
        outputs = []
        for seq, token, logprob in zip(seqs, token_ids, logprobs, strict=True):
            outputs.append(StepOutput(seq.owner, self._advance(seq, token, logprob)))
        for seq in seqs:
            if seq.finish_reason is not None:
                self._release(seq)
        return outputs

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> ChoiceDelta:
        seq.tokens.append(token)
        seq.generated += 1
        text = ""
        if token in seq.stop_token_ids:
            seq.finish_reason = "stop"  # the stop token's own text is never returned
            text = seq.stop.push(seq.text.flush())[0] + seq.stop.flush()
        else:
            text, hit_stop = seq.stop.push(seq.text.push(token))
            if hit_stop:
                seq.finish_reason = "stop"
            elif seq.generated >= seq.max_tokens or len(seq.tokens) >= self.max_seq_len:
                seq.finish_reason = "length"
                text += self._drain(seq)
        return ChoiceDelta(
            index=seq.index,
            token_ids=[token],
            text=text,
            logprobs=[logprob] if logprob is not None else None,
            finish_reason=seq.finish_reason,
        )

    @staticmethod
    def _drain(seq: Sequence) -> str:
        """Release the text held back at the end of a sequence that did not hit a stop string."""
        text, hit_stop = seq.stop.push(seq.text.flush())
        if hit_stop:
            seq.finish_reason = "stop"
            return text
        return text + seq.stop.flush()

    def _release(self, seq: Sequence) -> None:
        self.sequences.remove(seq)
        self.cache.free(seq.slot)
