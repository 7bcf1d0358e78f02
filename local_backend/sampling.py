"""Logits processing and sampling for a batch of sequences, each with its own parameters.

Order of operations for one decode step (the order HF and vLLM use):

    raw logits [B, V]
      -> penalties (presence / frequency: OpenAI, over generated tokens; repetition: HF,
         multiplicative, over prompt + generated tokens)
      -> greedy rows (temperature 0 or top_k 1) take the argmax here
      -> temperature -> top_k -> top_p (over the top_k-renormalised distribution)
      -> inverse-CDF draw with one uniform number per row

Reproducibility: every sequence owns a CPU `torch.Generator` and draws exactly one uniform
number per sampled token, so its tokens depend on its seed and its own logits only, never on
which other sequences share the batch (or on the device: the draw is made on the CPU).

Logprobs are those of the model's raw distribution (log_softmax of the unprocessed logits),
which is what OpenAI-compatible servers report.

Legend for shape comments: B = sequences in the batch, V = vocabulary size, P = rows that
use a given feature (penalties, logprobs), K = top-N logprobs asked for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = a fresh random seed per sequence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logprobs: int | None = None  # None = off; N = chosen token + top-N alternatives

    def __post_init__(self) -> None:
        # ValueError messages are shown to API users as 400 errors: they name the field.
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class SamplingState:
    """One sequence's sampling parameters, random generator and penalty bookkeeping."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_tokens: list[int],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.uses_openai_penalties = params.presence_penalty != 0 or params.frequency_penalty != 0
        self.uses_repetition_penalty = params.repetition_penalty != 1.0
        self.output_counts: torch.Tensor | None = None  # [V] int32: times each token was generated
        self.prompt_mask: torch.Tensor | None = None  # [V] bool: tokens present in the prompt
        if self.has_penalties:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        if self.uses_repetition_penalty:
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor(
                [t for t in prompt_tokens if 0 <= t < vocab_size], dtype=torch.long, device=device
            )
            self.prompt_mask[ids] = True

    @property
    def has_penalties(self) -> bool:
        return self.uses_openai_penalties or self.uses_repetition_penalty

    def record(self, token_id: int) -> None:
        """Account for a generated token (call once per sampled token)."""
        if self.output_counts is not None:
            self.output_counts[token_id] += 1

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Return logits [B, V] with each row's penalties applied (rows without any are unchanged)."""
    rows = [i for i, s in enumerate(states) if s.has_penalties]
    if not rows:
        return logits
    logits = logits.clone()
    idx = torch.tensor(rows, device=logits.device)
    picked = logits[idx]  # [P, V]
    counts = torch.stack([states[i].output_counts for i in rows]).to(picked.dtype)  # type: ignore[misc]
    # Repetition penalty (HF): divide positive logits, multiply negative ones, for every
    # token seen in the prompt or the output so far.
    rep = torch.tensor(
        [states[i].params.repetition_penalty for i in rows], device=logits.device
    ).unsqueeze(1)  # [P, 1]
    seen = counts > 0  # [P, V]
    for p, i in enumerate(rows):
        if states[i].prompt_mask is not None:
            seen[p] |= states[i].prompt_mask  # type: ignore[arg-type]
    picked = torch.where(seen, torch.where(picked > 0, picked / rep, picked * rep), picked)
    # Presence / frequency (OpenAI): subtract count * frequency + [count > 0] * presence,
    # counting generated tokens only.
    freq = torch.tensor(
        [states[i].params.frequency_penalty for i in rows], device=logits.device
    ).unsqueeze(1)  # [P, 1]
    pres = torch.tensor(
        [states[i].params.presence_penalty for i in rows], device=logits.device
    ).unsqueeze(1)  # [P, 1]
    picked = picked - counts * freq - (counts > 0).to(picked.dtype) * pres
    logits[idx] = picked
    return logits


def top_k_top_p_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top_k and top_p, in descending-logit order.

    logits [B, V]; temperature, top_p [B] float; top_k [B] long (0 = off).
    Returns (probs [B, V] sorted descending and renormalised, sorted token ids [B, V]).
    """
    scaled = logits / temperature.unsqueeze(1)  # [B, V]
    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True)  # [B, V] each
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)  # [B, 1]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)  # [B, V]
    # Keep the smallest prefix whose mass reaches top_p: a token stays while the mass of the
    # tokens ranked above it is still below top_p (so the first token always stays).
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [B, V]
    probs = probs.masked_fill(mass_before >= top_p.unsqueeze(1), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, sorted_ids


def sample(
    logits: torch.Tensor, states: list[SamplingState], greedy_tokens: torch.Tensor | None = None
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of logits [B, V]; returns (token ids, logprobs or None per row).

    `greedy_tokens` [B], when given, is logits.argmax(-1) computed already (inside the decode
    graph): used as is where no row has penalties, which would change the argmax.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(states), "one state per logits row"
    raw = logits.float()
    penalised = any(s.has_penalties for s in states)
    processed = apply_penalties(raw, states) if penalised else raw
    random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if greedy_tokens is not None and not penalised:
        tokens = greedy_tokens.clone() if random_rows else greedy_tokens
    else:
        tokens = torch.argmax(processed, dim=-1)  # [B]; kept for the greedy rows

    if random_rows:
        device = logits.device
        idx = torch.tensor(random_rows, device=device)
        params = [states[i].params for i in random_rows]
        probs, sorted_ids = top_k_top_p_probs(
            processed[idx],
            torch.tensor([p.temperature for p in params], device=device),
            torch.tensor([p.top_k for p in params], device=device, dtype=torch.long),
            torch.tensor([p.top_p for p in params], device=device),
        )
        cdf = torch.cumsum(probs, dim=-1)  # [P, V]
        uniforms = torch.tensor([states[i].uniform() for i in random_rows], device=device)
        # u * total guards against the cdf ending a hair below 1.0 in float32.
        targets = (uniforms * cdf[:, -1]).unsqueeze(1)  # [P, 1]
        rank = torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.shape[1] - 1)  # [P, 1]
        tokens[idx] = sorted_ids.gather(1, rank).squeeze(1)

    token_list: list[int] = tokens.tolist()  # the one device-to-host sync of the step
    if penalised:
        for state, token in zip(states, token_list, strict=True):
            state.record(token)
    return token_list, _logprobs(raw, token_list, states)


def _logprobs(
    raw: torch.Tensor, tokens: list[int], states: list[SamplingState]
) -> list[TokenLogprob | None]:
    result: list[TokenLogprob | None] = [None] * len(states)
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not rows:
        return result
    idx = torch.tensor(rows, device=raw.device)
    logprobs = torch.log_softmax(raw[idx], dim=-1)  # [P, V]
    chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in rows], device=raw.device))
    k = max(states[i].params.logprobs or 0 for i in rows)
    top_values, top_ids = torch.topk(logprobs, k, dim=-1) if k else (None, None)  # [P, K]
    for p, i in enumerate(rows):
        n_top = states[i].params.logprobs or 0
        top: list[tuple[int, float]] = []
        if n_top and top_values is not None and top_ids is not None:
            top = list(
                zip(top_ids[p, :n_top].tolist(), top_values[p, :n_top].tolist(), strict=True)
            )
        result[i] = TokenLogprob(tokens[i], float(chosen[p, 0]), top)
    return result
