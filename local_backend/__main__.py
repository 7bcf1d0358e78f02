"""Command line of the local backend.

    python -m local_backend serve --model-dir DIR [--device cuda] [--dtype bfloat16]
        [--host 127.0.0.1] [--port 8001] [--model-name NAME] [--max-slots 8]
        [--max-seq-len 4096] [--queue-size 64] [--weight-format bf16|int8|int4]
        [--kernels triton|torch] [--chat-format vicuna|mistral_v3] [--cpu-threads N]
        [--alias NAME ...] [--stay-up-on-load-failure] [--tensor-parallel N]
    torchrun --nproc-per-node N -m local_backend serve --model-dir DIR [...]
    python -m local_backend plan --model-dir DIR [--device ...] [--dtype ...] [...]

`serve` checks the memory plan first (a model that cannot fit exits with the arithmetic, code
2), then answers /livez at once, /readyz with the load's progress, and /readyz 200 once the
weights are loaded. A load that fails exits with code 1 (the reason is logged) unless
--stay-up-on-load-failure keeps the server up to report it on /readyz. Loading shows a tqdm
bar on a terminal, else a log line every 10 s (bytes, shards, GB/s). Over N ranks
(`--tensor-parallel N` spawns them, torchrun starts them) the plan is one rank's and rank 0
serves HTTP (parallel_serve.py, docs/multi_gpu.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from local_backend import memory_plan
from local_backend.config import ConfigError, ModelConfig
from local_backend.load_progress import LoadState
from local_backend.loader import (
    DEFAULT_MAX_SEQ_LEN,
    DTYPES,
    default_device,
    default_dtype,
    load_service,
    plan_memory,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local_backend")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "serve the OpenAI API"), ("plan", "print the memory plan")):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("--model-dir", required=True, type=Path, help="Hugging Face folder")
        cmd.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if any)")
        cmd.add_argument("--dtype", choices=sorted(DTYPES), default=None)
        cmd.add_argument("--max-slots", type=int, default=8, help="concurrent sequences")
        cmd.add_argument("--max-seq-len", type=int, default=None, help="tokens per sequence")
        cmd.add_argument("--weight-format", choices=sorted(memory_plan.FORMATS), default=None)
        cmd.add_argument("--tensor-parallel", type=int, default=1, help="ranks (one per GPU)")
        if name == "serve":
            cmd.add_argument("--host", default="127.0.0.1")
            cmd.add_argument("--port", type=int, default=8001)
            cmd.add_argument("--model-name", default=None, help="served name (default: folder)")
            cmd.add_argument("--queue-size", type=int, default=64, help="waiting requests")
            cmd.add_argument("--kernels", choices=("triton", "torch"), default=None)
            cmd.add_argument("--chat-format", choices=("vicuna", "mistral_v3"), default=None)
            cmd.add_argument("--cpu-threads", type=int, default=None, help="torch CPU threads")
            cmd.add_argument("--log-level", default="info")
            cmd.add_argument(
                "--alias", action="append", default=[], help="another model name to answer to"
            )
            cmd.add_argument(
                "--stay-up-on-load-failure", action="store_true",
                help="keep serving /readyz (status failed, with the reason) after a failed load",
            )  # fmt: skip
    return parser


def check_plan(args: argparse.Namespace, ranks: int = 1) -> memory_plan.MemoryPlan:
    """The plan for the asked model/device/dtype/context (one rank's of `ranks`); exits with
    code 2 if it cannot fit."""
    config = ModelConfig.from_model_dir(args.model_dir)
    device = torch.device(args.device or default_device())
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    seq_len = min(args.max_seq_len or DEFAULT_MAX_SEQ_LEN, config.max_seq_len)
    if ranks > 1:
        from local_backend.parallel_serve import plan_rank

        try:
            plan = plan_rank(config, device, dtype, seq_len, args.max_slots, ranks,
                             args.weight_format)  # fmt: skip
        except (memory_plan.DoesNotFitError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from None
    elif device.type == "cuda" or args.weight_format:
        try:
            plan = memory_plan.choose_format(
                config, device, override=args.weight_format, max_seq_len=seq_len,
                max_slots=args.max_slots,
            )  # fmt: skip
        except memory_plan.DoesNotFitError as exc:
            raise SystemExit(f"error: {exc}") from None
    else:
        plan = plan_memory(config, device, dtype, seq_len, args.max_slots)
    print(f"{config.name} on {device}: {plan.reason}", file=sys.stderr)
    if not plan.fits:
        raise SystemExit(2)
    return plan


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from local_backend.server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    launch = None
    if args.tensor_parallel > 1 or torch.distributed.is_torchelastic_launched():
        launch = launch_ranks(args)  # a follower rank runs to its end in here
    else:
        check_plan(args)
    model_name = args.model_name or args.model_dir.name

    state = LoadState()

    def loader():  # type: ignore[no-untyped-def]
        return load_service(
            args.model_dir,
            device=launch.device if launch else args.device,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            model_name=model_name,
            max_slots=args.max_slots,
            max_seq_len=args.max_seq_len,
            queue_size=args.queue_size,
            weight_format=args.weight_format,
            kernel_backend=args.kernels,
            chat_format=args.chat_format,
            model_loader=launch.load_leader_model if launch else None,
            aliases=tuple(args.alias),
            progress=state.progress,
        )

    def load_all_ranks():  # type: ignore[no-untyped-def]
        from local_backend.parallel_serve import agree_loaded

        assert launch is not None
        return agree_loaded(launch.parallel, loader)  # every rank loaded, or all fail

    server: uvicorn.Server | None = None

    def load_failed(reason: str) -> None:
        if not args.stay_up_on_load_failure and server is not None:
            server.should_exit = True  # main() then exits with code 1

    app = create_app(
        loader=loader if launch is None else load_all_ranks,
        model_name=model_name,
        load_state=state,
        on_load_failed=load_failed,
    )
    asgi: Any = app
    if launch is not None:
        from local_backend.parallel_serve import CloseRanksOnShutdown

        asgi = CloseRanksOnShutdown(app, lambda: launch.close(app.state.holder.service))
    config = uvicorn.Config(asgi, host=args.host, port=args.port, log_level=args.log_level.lower())
    server = uvicorn.Server(config)
    server.run()
    if state.phase == "failed":
        raise SystemExit(f"error: the model did not load: {state.reason}")


def launch_ranks(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Plan one rank's share, then spawn the other ranks (--tensor-parallel N) or join
    torchrun's; returns rank 0's RankLaunch, and exits on the other ranks once they are done."""
    from local_backend.parallel_serve import launch_from_args

    torchrun = torch.distributed.is_torchelastic_launched()
    if not torchrun:
        check_plan(args, args.tensor_parallel)  # before starting anything
    config = ModelConfig.from_model_dir(args.model_dir)
    device = torch.device(args.device or default_device())
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    seq_len = min(args.max_seq_len or DEFAULT_MAX_SEQ_LEN, config.max_seq_len)
    launch = launch_from_args(args, seq_len, dtype)
    if torchrun:
        check_plan(args, launch.parallel.world_size)  # every rank exits alike on a misfit
    if not launch.parallel.is_leader:
        raise SystemExit(launch.follow())
    return launch


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":
            check_plan(args, args.tensor_parallel)
        else:
            serve(args)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
