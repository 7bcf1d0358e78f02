"""Build a ready OpenAIService from a model folder, checking memory before loading anything.

    plan = plan_memory(config, "cuda", torch.bfloat16, max_seq_len=8192, max_slots=8)
    service = load_service("/models/WizardLM-2-8x22B", device="cuda", max_slots=8)

The server (`python -m local_backend serve`) and the gateway's in-process provider both call
load_service. On CUDA (or when a weight format is forced) the weights go through
quantize.load_quantized, which picks the widest of bf16 / int8 / int4 that fits the device with
the asked KV cache; elsewhere they load as-is in `dtype`. Both paths install the kernel backend
that kernels.select_backend picks (triton on CUDA, torch elsewhere; `kernel_backend` forces
one), and the engine's decode follows it (decode_runner.py). Either way memory_plan decides up
front, and DoesNotFitError explains the arithmetic instead of an out-of-memory error mid-load.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from local_backend import memory_plan
from local_backend.config import ModelConfig
from local_backend.engine import Engine
from local_backend.load_progress import LoadProgress
from local_backend.model import Transformer
from local_backend.openai_api import OpenAIService
from local_backend.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 4096
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    # bf16 matmuls on CPU are slow and imprecise; CPU runs are for small models and tests.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def plan_memory(
    config: ModelConfig,
    device: str | torch.device | int,
    dtype: torch.dtype,
    max_seq_len: int,
    max_slots: int,
    tokens_per_step: int = 2048,
    ranks: int = 1,
) -> memory_plan.MemoryPlan:
    """memory_plan's unquantized plan, with weights and KV cache scaled to `dtype`'s width
    (one rank's share with `ranks`)."""
    base = memory_plan.plan(
        config,
        device if isinstance(device, int) else torch.device(device),
        "bf16",
        max_seq_len=max_seq_len,
        max_slots=max_slots,
        tokens_per_step=tokens_per_step,
        ranks=ranks,
    )
    width = torch.empty((), dtype=dtype).element_size()
    return dataclasses.replace(
        base,
        weights=base.weights * width // 2,
        kv_cache=base.kv_cache * width // 2,
        kv_bytes_per_token=base.kv_bytes_per_token * width // 2,
        format=str(dtype).removeprefix("torch."),
    )


def load_tokenizer(model_dir: Path, model_or_format: str) -> Tokenizer:
    """The folder's own tokenizer; without tokenizer files, mistral-common's file for the
    model's prompt format (v1 for WizardLM-2, v3 for Mixtral-Instruct)."""
    try:
        return Tokenizer.from_model_dir(model_dir)
    except FileNotFoundError:
        try:
            tokenizer = Tokenizer.for_model(model_or_format)
        except ValueError:
            raise FileNotFoundError(
                f"{model_dir} has no tokenizer.model or tokenizer.json, and no bundled "
                f"tokenizer is known for {model_or_format!r} (pass --chat-format)"
            ) from None
        log.warning("%s has no tokenizer files; using %s", model_dir, tokenizer.source)
        return tokenizer


def load_model(
    model_dir: str | Path,
    device: str | torch.device,
    dtype: torch.dtype,
    max_seq_len: int,
    max_slots: int,
    weight_format: str | None = None,
    kernel_backend: str | None = None,
    prefill_token_budget: int = 2048,
    progress: bool | LoadProgress = True,
) -> Transformer:
    """Plan, then load; raises memory_plan.DoesNotFitError before reading any weights."""
    device = torch.device(device)
    sizes = {"max_seq_len": max_seq_len, "max_slots": max_slots}
    if device.type == "cuda" or weight_format is not None:
        from local_backend.quantize import load_quantized

        model, plan = load_quantized(
            model_dir, device, fmt=weight_format, backend=kernel_backend, dtype=dtype,
            progress=progress, tokens_per_step=prefill_token_budget, **sizes,
        )  # fmt: skip
        log.info("memory plan: %s", plan.reason)
        return model
    from local_backend.kernels import install, select_backend  # imports triton: load time only

    backend = select_backend(device, kernel_backend)  # a backend that cannot run fails here
    config = ModelConfig.from_model_dir(model_dir)
    plan = plan_memory(config, device, dtype, tokens_per_step=prefill_token_budget, **sizes)
    log.info("memory plan: %s", plan.reason)
    if not plan.fits:
        raise memory_plan.DoesNotFitError(plan.reason)
    model = Transformer.from_model_dir(model_dir, device=device, dtype=dtype, progress=progress)
    return install(model, backend)


def load_service(
    model_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    model_name: str | None = None,
    max_slots: int = 8,
    max_seq_len: int | None = None,
    queue_size: int = 64,
    weight_format: str | None = None,
    kernel_backend: str | None = None,
    chat_format: str | None = None,
    model_loader: Callable[..., torch.nn.Module] | None = None,
    aliases: tuple[str, ...] = (),
    progress: bool | LoadProgress = True,
) -> OpenAIService:
    """Load model and tokenizer from `model_dir`, start an Engine, wrap it for OpenAI.

    A `max_seq_len` beyond the model's context is clamped to it (with a warning): the
    gateway's LOCAL_MAX_SEQ_LEN default must not refuse a model with a shorter context.
    `aliases` are further model names the service answers to (the catalog's ids).
    `model_loader` replaces load_model (same arguments), e.g. rank 0's shard of
    a model over several GPUs (parallel_serve.RankLaunch.load_leader_model)."""
    model_dir = Path(model_dir)
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    config = ModelConfig.from_model_dir(model_dir)
    seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, config.max_seq_len)
    if max_seq_len and max_seq_len > config.max_seq_len:
        log.warning(
            "max_seq_len %d exceeds the model's context; serving %d tokens per sequence",
            max_seq_len, config.max_seq_len,
        )  # fmt: skip
    name = model_name or model_dir.name
    tokenizer = load_tokenizer(model_dir, chat_format or name)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens but the "
            f"model only {config.vocab_size}"
        )
    if model_loader is not None:
        model = model_loader(
            model_dir, device, dtype, seq_len, max_slots, weight_format, kernel_backend,
            progress=progress,
        )  # fmt: skip
    else:
        model = load_model(
            model_dir, device, dtype, seq_len, max_slots, weight_format, kernel_backend,
            progress=progress,
        )  # fmt: skip
    engine = Engine(
        model, tokenizer, model.config, max_slots=max_slots, max_seq_len=seq_len,
        queue_size=queue_size,
    ).start()  # fmt: skip
    return OpenAIService(engine, model_name=name, aliases=aliases, chat_format=chat_format)
