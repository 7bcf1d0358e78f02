"""Tensor- and expert-parallel inference over torch.distributed: which part of the model each
rank holds, and where the ranks' partial results meet.

    parallel = SINGLE_PROCESS                             # world size 1: nothing is split
    parallel = init_parallel(torch.device("cuda", 0))     # joins the process group (env:// under
                                                          # torchrun), NCCL on CUDA, gloo on CPU
    model = Transformer.from_config(config, device="meta", parallel=parallel)

The split, gpt-fast / Megatron style, over W ranks (rank r):

- Attention (tensor parallel): rank r holds query heads [r*H/W, (r+1)*H/W) and key/value heads
  [r*K/W, (r+1)*K/W). Grouped-query attention maps query head h to kv head h // (H/K), so a
  rank's query heads only ever read its own kv heads. wq/wk/wv are split by output rows
  ("column parallel"), wo by input columns ("row parallel"): each rank's wo output is a
  partial sum over its heads, and an all_reduce adds the W partial sums.
- MoE (expert parallel): rank r holds experts [r*E/W, (r+1)*E/W). The router is replicated, so
  every rank computes the same top-k for every token; each rank applies only its own experts
  (mixed by the global router weights) and an all_reduce adds the W partial sums.
- Replicated: token embeddings, norms, routers and the output head. The embedding and head are
  0.8 GB of the 8x22B's 281 GB (0.3%); splitting the vocabulary would save 0.6 GB per rank at
  W = 4 but add a collective per step (an all-gather of [B, V] logits so rank 0 can sample),
  on the latency path, for nothing the memory plan needs (docs/multi_gpu.md).
- KV cache: each rank caches its own kv heads, 1/W of the single-process cache.

So a layer costs two all_reduces of its [B, T, D] activations. They are forward hooks on the
Attention and MoE modules (`sum_outputs_across_ranks`), not calls inside their forward, so the
kernel backends' forwards (kernels.install replaces `forward`) are summed the same way.

Two process groups: `group` carries the layer outputs on the device (NCCL on GPUs, gloo on CPU);
`control_group` is gloo on the host and carries rank 0's step inputs to the followers
(parallel_worker.py), with a long timeout so an idle server does not time its followers out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

STEP_TIMEOUT = timedelta(minutes=10)  # joining, and any collective inside a forward step
CONTROL_TIMEOUT = timedelta(days=1)  # a follower waiting for rank 0's next step (keep-alives
# every few minutes keep it well inside this, see parallel_worker.StepLeader)


class TensorSplit(NamedTuple):
    """The part of a full tensor one rank loads: indices [start, stop) of dimension `dim`."""

    dim: int
    start: int
    stop: int
    size: int  # the full tensor's size along `dim`


# Which of our parameters are split, and along which dimension of their (HF-shaped) tensor.
_SPLIT_DIMS = (
    (re.compile(r"layers\.\d+\.attention\.w[qkv]\.weight"), 0),  # [heads * Dh, D]: by rows
    (re.compile(r"layers\.\d+\.attention\.wo\.weight"), 1),  # [D, heads * Dh]: by columns
    (re.compile(r"layers\.\d+\.block_sparse_moe\.w[123]"), 0),  # [E, ...]: by expert
)


@dataclass(frozen=True, eq=False)
class ParallelContext:
    """This process's place among the ranks; passed to the model's modules at construction."""

    rank: int = 0  # within this context's ranks; 0 drives the engine
    world_size: int = 1
    group: Any = None  # torch.distributed group for the layer outputs (None: default group)
    control_group: Any = None  # gloo group for rank 0's step inputs
    leader: int = 0  # the global rank of this context's rank 0 (the source of broadcasts)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    # -- what this rank holds ---------------------------------------------------------------

    def part(self, total: int) -> int:
        """How many of `total` equal things (heads, experts) this rank holds."""
        return total // self.world_size

    def first(self, total: int) -> int:
        """The index of this rank's first one of `total` things."""
        return self.rank * self.part(total)

    def check(self, config: Any) -> None:
        """ValueError unless heads, kv heads and experts split evenly over the ranks."""
        counts = {
            "query heads": config.n_heads,
            "key/value heads": config.n_kv_heads,
            "experts": config.n_experts,
        }
        uneven = [f"{n} {what}" for what, n in counts.items() if n % self.world_size]
        if uneven:
            raise ValueError(
                f"{config.name} cannot be split over {self.world_size} ranks: "
                f"{', '.join(uneven)} do not divide evenly (use 1, 2, 4 or 8 ranks for 8x22B)"
            )

    def tensor_split(self, param: str, shape: Sequence[int]) -> TensorSplit | None:
        """What this rank loads of our parameter `param`, whose per-rank shape is `shape`
        (None: all of it). The weights loader reads just that slice from the safetensors."""
        if not self.is_parallel:
            return None
        for pattern, dim in _SPLIT_DIMS:
            if pattern.fullmatch(param):
                n = shape[dim]
                return TensorSplit(dim, self.rank * n, (self.rank + 1) * n, n * self.world_size)
        return None

    # -- where the partial results meet -----------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (the identity for one process)."""
        if self.is_parallel:
            dist.all_reduce(x, group=self.group)
        return x

    def sum_outputs_across_ranks(self, module: nn.Module) -> None:
        """Make `module`'s output the sum of every rank's output (a forward hook, so whichever
        forward a kernel backend installed is summed too). Nothing for one process."""
        if self.is_parallel:
            module.register_forward_hook(self._sum_hook)

    def _sum_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(output)

    # -- rank 0's step inputs ---------------------------------------------------------------

    def broadcast_from_leader(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's host tensor `x` into every rank's `x` (same shape and dtype), in place."""
        dist.broadcast(x, src=self.leader, group=self.control_group)
        return x

    def all_ranks_ok(self, ok: bool) -> list[int]:
        """Every rank says whether it is ok (e.g. loaded); returns the ranks that are not."""
        flags = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(flags, torch.tensor([int(ok)]), group=self.control_group)
        return [rank for rank, flag in enumerate(flags) if not flag.item()]


SINGLE_PROCESS = ParallelContext()


def device_for_rank(device_type: str, rank: int) -> torch.device:
    """Rank r's device: cuda:(r mod visible GPUs) on CUDA (one node), else the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(device_type)


def init_parallel(
    device_type: str,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout: timedelta = STEP_TIMEOUT,
) -> ParallelContext:
    """Join the process group (NCCL for "cuda", gloo otherwise) and return the context over all
    of it. rank, world_size and init_method default to torchrun's environment (env://)."""
    if not dist.is_initialized():
        if device_type == "cuda" and rank is not None:
            torch.cuda.set_device(device_for_rank("cuda", rank))
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo",
            init_method=init_method,
            rank=-1 if rank is None else rank,
            world_size=-1 if world_size is None else world_size,
            timeout=timeout,
        )
        if device_type == "cuda" and rank is None:  # torchrun: one GPU per local rank
            torch.cuda.set_device(device_for_rank("cuda", dist.get_rank()))
    context = context_over(range(dist.get_world_size()))
    assert context is not None
    return context


def context_over(ranks: Sequence[int]) -> ParallelContext | None:
    """A context over some `ranks` of the joined world (None on a rank outside them). Every
    rank of the world must call it, in the same order (torch.distributed.new_group's rule)."""
    ranks = list(ranks)
    everyone = len(ranks) == dist.get_world_size()
    group = dist.group.WORLD if everyone else dist.new_group(ranks)
    control = dist.new_group(ranks, backend="gloo", timeout=CONTROL_TIMEOUT)
    me = dist.get_rank()
    if me not in ranks:
        return None
    return ParallelContext(ranks.index(me), len(ranks), group, control, leader=ranks[0])


def shutdown_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
