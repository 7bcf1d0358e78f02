"""Serving one model over several ranks (one process per GPU): launch, load, follow.

    python -m local_backend serve --model-dir DIR --tensor-parallel 4   # spawns ranks 1..3
    torchrun --nproc-per-node 4 -m local_backend serve --model-dir DIR  # torchrun starts all 4

Rank 0 is the process that serves HTTP: it loads its shard in the server's loader thread and
drives the engine (RankLaunch.load_leader_model, load_service's `model_loader`, gives the
engine a StepLeader). Ranks 1..W-1 load their shards (load_rank_model), wait until every rank
has loaded (a failure anywhere fails them all, with the failing ranks named on rank 0's
/readyz), then follow rank 0's steps until it stops (run_follower). Each rank reads only its
slices of the safetensors (weights.py `split_for`).

Launching: `--tensor-parallel N` spawns N-1 follower processes (multiprocessing "spawn",
daemonic, so they end with rank 0) that meet rank 0 through a rendezvous file; under torchrun
every process joins through torchrun's environment and rank 0 alone starts the server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from local_backend import memory_plan
from local_backend.config import ModelConfig
from local_backend.kv_cache import KVCache
from local_backend.load_progress import LoadProgress
from local_backend.loader import default_device, plan_memory
from local_backend.model import Transformer
from local_backend.parallel import (
    ParallelContext,
    device_for_rank,
    init_parallel,
    shutdown_parallel,
)
from local_backend.parallel_worker import StepLeader, follow_steps
from local_backend.weights import load_weights

log = logging.getLogger(__name__)


def plan_rank(
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: int,
    max_slots: int,
    ranks: int,
    weight_format: str | None = None,
) -> memory_plan.MemoryPlan:
    """One rank's memory plan: on CUDA (or with a forced format) the widest format that fits
    one GPU (memory_plan.choose_format; DoesNotFitError when none does), else `dtype` on the
    CPU, where the ranks share the host's memory (each plans against 1/ranks of it)."""
    if device.type == "cuda" or weight_format is not None:
        return memory_plan.choose_format(config, device, override=weight_format,
                                         max_seq_len=max_seq_len, max_slots=max_slots,
                                         ranks=ranks)  # fmt: skip
    share = memory_plan.device_memory_bytes(device) // ranks
    return plan_memory(config, share, dtype, max_seq_len, max_slots, ranks=ranks)


def load_rank_model(
    model_dir: str | Path,
    parallel: ParallelContext,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: int,
    max_slots: int,
    weight_format: str | None = None,
    progress: bool | LoadProgress = False,
) -> Transformer:
    """This rank's shard of the model in `model_dir`, planned first (DoesNotFitError before
    reading any weight), quantized as it loads when the plan says so; torch kernels.
    `progress`: rank 0's load shows on /readyz and the terminal (the followers' do not)."""
    config = ModelConfig.from_model_dir(model_dir)
    parallel.check(config)
    plan = plan_rank(config, device, dtype, max_seq_len, max_slots, parallel.world_size,
                     weight_format)  # fmt: skip
    log.info("rank %d memory plan: %s", parallel.rank, plan.reason)
    if not plan.fits:
        raise memory_plan.DoesNotFitError(plan.reason)
    fmt = memory_plan.FORMATS.get(plan.format)
    quantizer = None
    if fmt is not None and fmt.bits < 16:
        from local_backend.quantize import LoadQuantizer

        quantizer = LoadQuantizer(fmt.name)
    model = Transformer.from_config(config, device="meta", dtype=dtype, parallel=parallel)
    load_weights(model, model_dir, device=device, dtype=dtype, transform=quantizer,
                 progress=progress, split_for=parallel.tensor_split)  # fmt: skip
    if quantizer is not None:
        # The torch backend: its quantized MoE loops over this rank's experts through the
        # module's route(); fused_moe has no expert range yet (docs/multi_gpu.md).
        quantizer.finalize(model, "torch")
    return model


@dataclass(frozen=True)
class RankOptions:
    """What every rank needs to load its shard and size its KV cache (sent to spawned ranks)."""

    model_dir: Path
    device_type: str  # "cuda" or "cpu": rank r takes cuda:r
    dtype: torch.dtype
    max_slots: int
    max_seq_len: int  # already clamped to the model's context, as load_service does
    weight_format: str | None = None
    cpu_threads: int | None = None
    log_level: str = "info"


def run_follower(options: RankOptions, parallel: ParallelContext) -> int:
    """Load this rank's shard, agree with the others that all loaded, follow rank 0's steps
    until it stops. Returns an exit code: 0, or 1 when any rank failed to load."""
    device = device_for_rank(options.device_type, parallel.rank)
    try:
        model = load_rank_model(options.model_dir, parallel, device, options.dtype,
                                options.max_seq_len, options.max_slots,
                                options.weight_format)  # fmt: skip
        cache = KVCache(model.config, options.max_slots, options.max_seq_len, device=device,
                        dtype=options.dtype, kv_heads=model.cache_kv_heads)  # fmt: skip
    except Exception:
        log.exception("rank %d: loading failed", parallel.rank)
        parallel.all_ranks_ok(False)
        return 1
    failed = parallel.all_ranks_ok(True)
    if failed:
        log.error("rank %d: rank(s) %s failed to load; stopping", parallel.rank, failed)
        return 1
    log.info("rank %d: loaded, following rank 0", parallel.rank)
    try:
        steps = follow_steps(model, cache, parallel)
    except RuntimeError as exc:  # rank 0 is gone (its connections closed) or a collective broke
        log.error("rank %d: lost rank 0, stopping: %s", parallel.rank, str(exc).splitlines()[0])
        return 1
    log.info("rank %d: stopped after %d steps", parallel.rank, steps)
    return 0


def agree_loaded(parallel: ParallelContext, load: Callable[[], Any]) -> Any:
    """Rank 0's side of run_follower's agreement: `load()`'s result once every rank has
    loaded; its exception (after telling the followers), or RuntimeError naming the ranks
    that failed."""
    try:
        service = load()
    except BaseException:
        parallel.all_ranks_ok(False)
        raise
    failed = parallel.all_ranks_ok(True)
    if failed:
        service.engine.stop()
        raise RuntimeError(f"rank(s) {failed} of {parallel.world_size} failed to load (see log)")
    return service


def _follower_process(options: RankOptions, rank: int, world_size: int, init: str) -> None:
    """A spawned rank's whole life (the target of multiprocessing)."""
    logging.basicConfig(
        level=options.log_level.upper(), format=f"%(levelname)s rank{rank} %(name)s %(message)s"
    )
    if options.cpu_threads:
        torch.set_num_threads(options.cpu_threads)
    parallel = init_parallel(options.device_type, rank, world_size, init)
    code = run_follower(options, parallel)
    shutdown_parallel()
    sys.exit(code)


@dataclass
class RankLaunch:
    """This process's part in a multi-rank server (see the module docstring)."""

    parallel: ParallelContext
    options: RankOptions
    children: list[Any] = field(default_factory=list)  # spawned followers (rank 0 only)
    rendezvous_dir: Path | None = None  # the spawned ranks' meeting file lives here

    @classmethod
    def spawn(cls, options: RankOptions, world_size: int) -> RankLaunch:
        """Start ranks 1..world_size-1 as child processes and join them as rank 0."""
        folder = Path(tempfile.mkdtemp(prefix="local-backend-ranks-"))
        init = f"file://{folder}/rendezvous"
        context = multiprocessing.get_context("spawn")
        children = [
            context.Process(
                target=_follower_process,
                args=(options, rank, world_size, init),
                name=f"local-backend-rank{rank}",
                daemon=True,  # ends with rank 0 whatever way rank 0 ends
            )
            for rank in range(1, world_size)
        ]
        for child in children:
            child.start()
        parallel = init_parallel(options.device_type, 0, world_size, init)
        return cls(parallel, options, children, folder)

    @classmethod
    def join_torchrun(cls, options: RankOptions) -> RankLaunch:
        return cls(init_parallel(options.device_type), options)

    @property
    def device(self) -> torch.device:
        return device_for_rank(self.options.device_type, self.parallel.rank)

    def load_leader_model(
        self,
        model_dir: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        max_seq_len: int,
        max_slots: int,
        weight_format: str | None = None,
        kernel_backend: str | None = None,
        progress: bool | LoadProgress = True,
    ) -> StepLeader:
        """Rank 0's shard, wrapped so that every forward reaches the followers: what
        load_service takes as its `model_loader` (loader.load_model's arguments)."""
        if kernel_backend == "triton":
            raise ValueError("--kernels triton does not run over several ranks yet; use torch")
        model = load_rank_model(model_dir, self.parallel, device, dtype, max_seq_len,
                                max_slots, weight_format, progress)  # fmt: skip
        return StepLeader(model)

    def follow(self) -> int:
        """A follower rank under torchrun: load, follow, leave the group; the exit code."""
        code = run_follower(self.options, self.parallel)
        shutdown_parallel()
        return code

    def close(self, service: Any | None) -> None:
        """After the server stopped (and its engine with it): stop the followers, wait for the
        spawned ones, leave the process group."""
        leader = getattr(getattr(service, "engine", None), "model", None)
        if isinstance(leader, StepLeader):
            leader.close()
        for child in self.children:
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()
        shutdown_parallel()
        if self.rendezvous_dir is not None:
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)


class CloseRanksOnShutdown:
    """ASGI wrapper: once the app's own shutdown is done (its engine stopped), stop the other
    ranks. Here rather than after uvicorn.run returns: uvicorn re-raises a captured SIGTERM
    (the process ends by it), so code after uvicorn.run never runs on a signal."""

    def __init__(self, app: Any, close: Callable[[], None]) -> None:
        self.app = app
        self.close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_then_close(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await asyncio.to_thread(self.close)
            await send(message)

        return await self.app(scope, receive, send_then_close)


def launch_from_args(args: argparse.Namespace, seq_len: int, dtype: torch.dtype) -> RankLaunch:
    """Spawn the ranks (--tensor-parallel N) or join torchrun's, from `serve`'s arguments."""
    device_type = torch.device(args.device or default_device())
    options = RankOptions(
        model_dir=args.model_dir,
        device_type=device_type.type,
        dtype=dtype,
        max_slots=args.max_slots,
        max_seq_len=seq_len,
        weight_format=args.weight_format,
        cpu_threads=args.cpu_threads,
        log_level=args.log_level,
    )
    if dist.is_torchelastic_launched():
        launch = RankLaunch.join_torchrun(options)
        if args.tensor_parallel not in (1, launch.parallel.world_size):
            raise SystemExit(
                f"error: --tensor-parallel {args.tensor_parallel} but torchrun started "
                f"{launch.parallel.world_size} ranks"
            )
        return launch
    return RankLaunch.spawn(options, args.tensor_parallel)
