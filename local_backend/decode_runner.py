"""The scheduler's decode forward (T = 1): kernels.decode_step replayed from CUDA graphs, or the
model's own forward.

    runner = DecodeRunner(model, cache, max_slots=8)
    runner.warm_up()                                   # capture every bucket now (CUDA only)
    logits = runner(tokens, positions, slots)          # B ints each -> float32 logits [B, V]

The path follows the backend `kernels.install` put on the model, which kernels.select_backend
chose once (through the loader's kernel_backend / the CLI's --kernels):

- triton: the batch is padded up to its bucket (1, 2, 4, ... max_slots) and run through
  kernels.decode_step, one kernels.capture_decode per bucket. On CUDA that is one graph replay
  instead of ~15 launches per layer; off CUDA (triton's interpreter, tests) capture_decode
  calls the step itself, so bucketing and padding run in CI exactly as on the GPU.
- torch (or a sliding-window model, whose decode_step is not capturable): model.forward on the
  batch as it is.

Padding rows are token 0, position -1, slot 0. At position -1 the cache write skips the row and
flash-decoding gives it length 0 (it reads no key and outputs zeros), so a padding row never
touches the cache, whether slot 0 is live or free. The graphs are captured from all-padding
static inputs for the same reason: warm-up and capture *run* the step, and with every position
at -1 they write nothing, so a bucket may be captured while sequences are live and no scratch
slot is reserved (one would cost a whole slot of KV cache, ~0.9 GB at 8x22B and 4k context).
Per step the host writes the rows into a (pinned, on CUDA) staging buffer, which one
asynchronous copy brings to the graph's static input; the graph also takes each row's argmax,
so a greedy batch samples with a copy of B ints (`greedy_tokens`) and no extra launch.
The price of bucketing: a padding row still goes through the projections and the router, and in
an MoE it may route to an expert no real row needs (more weight bytes read in that step); pass
`buckets` to trade graphs for padding.

Legend for shape comments: B = live rows, Bp = rows padded to the bucket, V = vocabulary.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from local_backend.config import ModelConfig

log = logging.getLogger(__name__)

PAD_TOKEN = 0  # any valid id: its logits are dropped
PAD_POSITION = -1  # "not a token": never written to the cache, attends to nothing
PAD_SLOT = 0  # any valid slot: a row at position -1 never reads or writes it

PackedStepFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def default_buckets(max_slots: int) -> tuple[int, ...]:
    """Powers of two below max_slots, then max_slots: (1, 2, 4, 8) for 8, (1, 2, 4, 6) for 6."""
    if max_slots < 1:
        raise ValueError(f"max_slots must be positive, got {max_slots}")
    powers = [1 << i for i in range(max_slots.bit_length()) if 1 << i < max_slots]
    return (*powers, max_slots)


class DecodeRunner:
    """Runs one decode step for the scheduler; see the module docstring for the two paths."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: Any,  # local_backend.kv_cache.KVCache
        max_slots: int,
        buckets: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.config = cast("ModelConfig", cache.config)  # the engine's: model need not carry one
        self.device = next(model.parameters()).device
        backend = getattr(model, "kernel_backend", "torch")
        self.uses_kernels = backend == "triton" and self.config.sliding_window is None
        self.buckets = tuple(sorted(set(buckets))) if buckets else default_buckets(max_slots)
        if self.buckets[0] < 1 or self.buckets[-1] < max_slots:
            raise ValueError(
                f"buckets {self.buckets} must be positive and reach max_slots ({max_slots})"
            )
        self._steps: dict[int, PackedStepFn] = {}  # bucket -> its graph (or, failing that, step)
        self._staging: dict[int, torch.Tensor] = {}  # bucket -> host buffer of its inputs
        # The argmax of each row of the last graph-path logits, computed inside the graph (the
        # greedy token: sampling reads it instead of launching its own argmax); None on the
        # torch path.
        self.greedy_tokens: torch.Tensor | None = None
        self.captured_buckets: set[int] = set()  # buckets replayed from a CUDA graph
        self.steps_per_bucket: Counter[int] = Counter()  # decode steps run at each bucket

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket holding `rows` rows."""
        for bucket in self.buckets:
            if bucket >= rows:
                return bucket
        raise ValueError(f"{rows} rows exceed the largest decode bucket ({self.buckets[-1]})")

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture every bucket's graph now (first-request latency, and memory, known up front);
        a no-op on the torch path. Capturing writes nothing to the cache (see module doc)."""
        if self.uses_kernels:
            for bucket in self.buckets:
                self._step_for(bucket)

    @torch.inference_mode()
    def __call__(
        self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]
    ) -> torch.Tensor:
        """Logits [B, V] (float32) of one decode step: tokens[b] at positions[b] of slots[b].

        On the graph path the result is a view of the graph's output buffer, which the next
        call overwrites: use it (sample from it) before calling again.
        """
        rows = len(tokens)
        self._check(tokens, positions, slots)
        if not self.uses_kernels:
            self.greedy_tokens = None
            inputs = torch.tensor([tokens, positions], dtype=torch.long).to(self.device)  # [2, B]
            slot_ids = torch.tensor(slots, dtype=torch.long).to(self.device)  # [B]
            # [B] -> [B, 1]: one token per row
            logits = self.model(inputs[0, :, None], inputs[1, :, None], self.cache, slot_ids)
            return logits[:, -1]  # [B, 1, V] -> [B, V]
        bucket = self.bucket_for(rows)
        staging = self._staging_for(bucket)  # [3, Bp]: tokens, positions, slots
        view = staging.numpy()  # writing through numpy: no tensor built per step
        view[0, :rows], view[1, :rows], view[2, :rows] = tokens, positions, slots
        view[0, rows:], view[1, rows:], view[2, rows:] = PAD_TOKEN, PAD_POSITION, PAD_SLOT
        # one (asynchronous, from pinned memory on CUDA) copy in, one graph replay
        logits, greedy = self._step_for(bucket)(staging)
        self.steps_per_bucket[bucket] += 1
        self.greedy_tokens = greedy[:rows]
        return logits[:rows, -1]  # [Bp, 1, V] -> [B, V]: padding rows dropped

    def _check(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> None:
        """Bounds on the host ints (decode_step has no check: on the device it would sync)."""
        if not tokens or not len(tokens) == len(positions) == len(slots):
            raise ValueError(
                f"a decode step needs one token, position and slot per row, got "
                f"{len(tokens)}, {len(positions)}, {len(slots)}"
            )
        if len(set(slots)) != len(slots):
            raise ValueError(f"two rows share a cache slot: {list(slots)}")
        checks = (
            ("token ids", tokens, self.config.vocab_size),
            ("positions", positions, self.cache.max_seq_len),
            ("slots", slots, self.cache.max_slots),
        )
        for name, values, limit in checks:
            if not all(0 <= v < limit for v in values):
                raise ValueError(f"{name} must lie in [0, {limit}), got {list(values)}")

    def _staging_for(self, bucket: int) -> torch.Tensor:
        staging = self._staging.get(bucket)
        if staging is None:
            pinned = self.device.type == "cuda"
            staging = torch.empty(3, bucket, dtype=torch.long, pin_memory=pinned)
            self._staging[bucket] = staging
        return staging

    def _step_for(self, bucket: int) -> PackedStepFn:
        step = self._steps.get(bucket)
        if step is None:
            step = self._steps[bucket] = self._capture(bucket)
        return step

    def _capture(self, bucket: int) -> PackedStepFn:
        from local_backend.kernels import capture_decode, decode_step

        def step(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """packed [3, Bp] on the device -> (logits [Bp, 1, V], their argmax [Bp])."""
            tokens, positions, slots = packed[0, :, None], packed[1, :, None], packed[2]
            logits = decode_step(self.model, tokens, positions, self.cache, slots)
            return logits, logits[:, -1].argmax(dim=-1)

        static = torch.tensor(
            [[PAD_TOKEN] * bucket, [PAD_POSITION] * bucket, [PAD_SLOT] * bucket],
            dtype=torch.long,
            device=self.device,
        )  # all padding: warm-up and capture leave the cache untouched
        try:
            graph = capture_decode(step, static)
        except Exception:  # serve uncaptured (slower) rather than not at all
            log.warning("CUDA graph capture failed for decode batch %d", bucket, exc_info=True)
            return lambda packed: step(packed.to(self.device))
        if graph.captured:
            self.captured_buckets.add(bucket)
            log.info("captured the decode step for batch %d in a CUDA graph", bucket)
            return cast(PackedStepFn, graph)
        return lambda packed: step(packed.to(self.device))
