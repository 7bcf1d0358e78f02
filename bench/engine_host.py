"""Host work per decode step of the Engine: everything between two forward passes (decode
inputs, sampling, detokenizing, stop checks, the hand-off to the asyncio consumer).

The model is replaced by `LogitsStub`, whose forward indexes a table of precomputed logits
(microseconds), so an engine step is host work alone; the consumer runs on an asyncio loop
in the main thread as the server's does (its work competes for the GIL like in production).

    host_us_per_step(batch) -> (period, engine-thread CPU) microseconds per decode step

bench/engine_decode.py prints it beside the GPU step time; on a GPU the same work hides
nothing, it adds to every step (the sampled token must reach the host before the next step).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from typing import Any

import torch
from torch import nn

from local_backend.config import ModelConfig
from local_backend.engine import Engine
from local_backend.generation import GenerationRequest
from local_backend.sampling import SamplingParams
from local_backend.tokenizer import Tokenizer

_ROWS = 97  # distinct logits rows: tokens vary from step to step like real text
_MAX_BATCH = 64


class LogitsStub(nn.Module):
    """A stand-in Transformer whose logits cost nothing: a view of rows of a table, chosen by
    the first row's position (no copy, so the step's time is the engine's own)."""

    table: torch.Tensor

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)
        generator = torch.Generator().manual_seed(0)
        table = torch.randn(_ROWS + _MAX_BATCH, config.vocab_size, generator=generator) * 4
        table[:, : config.eos_id + 1] = -1e9  # never a control token: every step emits text
        self.register_buffer("table", table.to(device))

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        slots: torch.Tensor,
        last_token_only: bool = False,
    ) -> torch.Tensor:
        start = int(positions[0, -1].clamp_min(0)) % _ROWS
        rows = self.table[start : start + tokens.shape[0], None]  # [B, 1, V], a view
        return rows if last_token_only else rows.expand(-1, tokens.shape[1], -1)


def stub_config() -> ModelConfig:
    return ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate=16,
                       vocab_size=32000, max_seq_len=4096, name="stub")  # fmt: skip


class StepClock:
    """Times each engine step from inside the engine thread: the thread's CPU time for the
    step (scheduler.step + dispatch to the consumers) and the period between step starts.
    Thread CPU time leaves out waiting for a core, which a shared machine is full of."""

    def __init__(self, engine: Engine) -> None:
        self.cpu: list[float] = []
        self.starts: list[float] = []
        step, dispatch = engine._scheduler.step, engine._dispatch
        pending: list[float] = []

        def timed_step() -> Any:
            self.starts.append(time.perf_counter())
            pending.append(time.thread_time())
            return step()

        def timed_dispatch(outputs: Any) -> None:
            dispatch(outputs)
            if pending:
                self.cpu.append(time.thread_time() - pending.pop())

        engine._scheduler.step = timed_step  # type: ignore[method-assign]
        engine._dispatch = timed_dispatch  # type: ignore[method-assign]

    def reset(self) -> None:
        self.cpu.clear()
        self.starts.clear()


async def _run(engine: Engine, batch: int, steps: int, prompt: list[int]) -> None:
    params = SamplingParams(temperature=0.0)

    async def consume(request: GenerationRequest) -> None:
        async with engine.submit(request) as stream:
            async for _ in stream:
                pass

    requests = [GenerationRequest(prompt, steps, params, ignore_eos=True) for _ in range(batch)]
    await asyncio.gather(*(consume(r) for r in requests))


def host_us_per_step(
    batch: int, steps: int = 64, repeats: int = 3, tokenizer: Tokenizer | None = None
) -> tuple[float, float]:
    """(period, CPU) microseconds per decode step at `batch`: the median over the decode
    steps of `repeats` runs (the prefill step and the last one are left out) of the time
    between step starts in the engine thread, and of that thread's CPU time per step."""
    config = stub_config()
    tokenizer = tokenizer or Tokenizer.from_mistral_common("v1")
    engine = Engine(LogitsStub(config), tokenizer, config, max_slots=batch,
                    max_seq_len=steps + 64, queue_size=batch).start()  # fmt: skip
    clock = StepClock(engine)
    prompt = list(range(100, 132))
    periods: list[float] = []
    cpu: list[float] = []
    try:
        asyncio.run(_run(engine, batch, 4, prompt))  # warm-up
        for _ in range(repeats):
            clock.reset()
            asyncio.run(_run(engine, batch, steps, prompt))
            periods += [b - a for a, b in itertools.pairwise(clock.starts[1:-1])]
            cpu += clock.cpu[1:-1]
    finally:
        engine.stop()
    return statistics.median(periods) * 1e6, statistics.median(cpu) * 1e6


def main() -> None:
    torch.set_num_threads(1)  # a shared CPU: one thread gives steady figures
    tokenizer = Tokenizer.from_mistral_common("v1")
    for batch in (1, 8, 32):
        wall, cpu = host_us_per_step(batch, tokenizer=tokenizer)
        print(f"batch {batch}: step period {wall:.0f} us, engine thread CPU {cpu:.0f} us")


if __name__ == "__main__":
    main()
