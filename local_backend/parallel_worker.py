"""Rank 0 drives, the other ranks follow: every forward step's inputs go from rank 0 to all.

    leader = StepLeader(model)              # rank 0: give `leader` to the Engine as its model
    ...                                     # each leader(tokens, positions, cache, slots, ...)
    leader.close()                          # sends STOP; the followers return

    follow_steps(model, cache, parallel)    # ranks 1..W-1: run each step rank 0 sends

The engine, scheduler and sampling run on rank 0 only: they decide every step's tokens,
positions and cache slots (slots are allocated on rank 0; each rank's KV cache has the same
slots and positions for its own heads). Only the inputs cross to the followers, over the gloo
control group on the host (ParallelContext.control_group): a header [command, B, T,
last_token_only], then tokens, positions and slots packed in one int64 tensor. The follower
runs the same forward on the same inputs, so the collectives inside it (parallel.py) pair up;
its logits are dropped (sampling happens on rank 0 only).

A failing step (a bad input the model's bounds check rejects) fails the same way on every
rank, before any collective: each logs it and goes on, as rank 0's engine does. While idle,
rank 0 sends a KEEPALIVE every `keepalive_s` so the followers' wait never reaches the control
group's timeout.

On GPUs this path runs the model's forward (the torch kernels): the triton decode path
(DecodeRunner's CUDA graphs) would need the header and inputs sent before the graph replay
and fused_moe to take this rank's expert range (docs/multi_gpu.md).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from local_backend.parallel import ParallelContext

log = logging.getLogger(__name__)

STOP, STEP, KEEPALIVE = 0, 1, 2
DEFAULT_KEEPALIVE_S = 300.0


@dataclass
class Step:
    tokens: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    slots: torch.Tensor  # [B]
    last_token_only: bool


class StepLeader(nn.Module):
    """Rank 0's model: sends each forward's inputs to the followers, then runs its own shard.

    It stands in for the Transformer wherever the engine takes a model (config, parameters,
    cache_kv_heads and forward are the model's).
    """

    def __init__(self, model: Any, keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.parallel: ParallelContext = model.parallel
        if not self.parallel.is_leader:
            raise ValueError(f"rank {self.parallel.rank} is a follower, not the leader")
        self._send_lock = threading.Lock()  # the engine thread and the keep-alive thread
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        self._keepalive_s = keepalive_s
        # Started by the first step, not here: until then the control group may carry other
        # collectives (parallel_serve's check that every rank loaded).
        self._keepalive = threading.Thread(target=self._keep_alive, name="keepalive", daemon=True)

    @property
    def cache_kv_heads(self) -> int:
        return int(self.model.cache_kv_heads)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        slots: torch.Tensor,
        last_token_only: bool = False,
    ) -> torch.Tensor:
        B, T = tokens.shape
        packed = torch.cat([tokens.reshape(-1), positions.reshape(-1), slots.reshape(-1)])
        self._send(STEP, B, T, int(last_token_only), payload=packed.to("cpu", torch.int64))
        return self.model(tokens, positions, cache, slots, last_token_only)

    def close(self) -> None:
        """Tell the followers to stop (idempotent). Call once the engine has stopped."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._keepalive.is_alive():
            self._keepalive.join()
        self._send(STOP, 0, 0, 0)

    def _send(self, command: int, B: int, T: int, flag: int, payload: Any = None) -> None:
        with self._send_lock:
            if command == STEP and not self._keepalive.ident:
                self._keepalive.start()
            self.parallel.broadcast_from_leader(torch.tensor([command, B, T, flag]))
            if payload is not None:
                self.parallel.broadcast_from_leader(payload)
            self._last_send = time.monotonic()

    def _keep_alive(self) -> None:
        while not self._closed.wait(self._keepalive_s / 4):
            if time.monotonic() - self._last_send >= self._keepalive_s:
                try:
                    self._send(KEEPALIVE, 0, 0, 0)
                except Exception:  # a follower is gone; the next step reports it
                    log.exception("keep-alive to the follower ranks failed")
                    return


def receive_step(parallel: ParallelContext, device: torch.device) -> Step | int:
    """The next step from rank 0, or the command (STOP, KEEPALIVE) that carries none."""
    header = parallel.broadcast_from_leader(torch.zeros(4, dtype=torch.int64))
    command, B, T, flag = header.tolist()
    if command != STEP:
        return int(command)
    packed = parallel.broadcast_from_leader(torch.empty(2 * B * T + B, dtype=torch.int64))
    packed = packed.to(device)
    return Step(
        tokens=packed[: B * T].view(B, T),
        positions=packed[B * T : 2 * B * T].view(B, T),
        slots=packed[2 * B * T :],
        last_token_only=bool(flag),
    )


def follow_steps(model: Any, cache: Any, parallel: ParallelContext) -> int:
    """Run every step rank 0 sends, in order, until STOP; returns how many ran."""
    device = next(model.parameters()).device
    steps = 0
    with torch.inference_mode():
        while True:
            step = receive_step(parallel, device)
            if step == STOP:
                return steps
            if not isinstance(step, Step):  # KEEPALIVE
                continue
            steps += 1
            try:
                model(step.tokens, step.positions, cache, step.slots, step.last_token_only)
            except Exception:  # rank 0 fails this step the same way (module docstring)
                log.exception("rank %d: step %d failed", parallel.rank, steps)
