"""What fits a device: bytes for weights, KV cache and workspace at bf16 / int8 / int4.

Public API:

    FORMATS                     named WeightFormats (below)
    DEVICE_MEMORY               bytes of the GPUs we plan for, as nvidia-smi reports them
    weight_bytes(config, fmt, ranks=1)   bytes of every parameter (one rank's) in that format
    kv_cache_bytes(config, max_seq_len, max_slots, ranks=1)
    workspace_bytes(config, fmt, max_seq_len, max_slots, tokens_per_step, ranks=1)
    plan(config, device_memory, weight_format, ..., ranks=1) -> MemoryPlan (fits or not, and why)
    choose_format(config, device_memory, ..., ranks=1) -> MemoryPlan of the widest that fits
    decode_tokens_per_s_bound(config, fmt, bandwidth) -> batch-1 speed limit from bandwidth
    DoesNotFitError             choose_format found nothing that fits

Every number is computed from the ModelConfig. Assumptions, stated once:

- bf16: every parameter takes 2 bytes.
- int8: weight-only, symmetric, one bf16 scale per output channel (row) of each matrix.
- int4: weight-only, symmetric, two values per byte, one bf16 scale per group of 128 inputs.
- Which matrices are quantized: in "int8" / "int4" the experts' w1/w2/w3 AND the attention
  projections wq/wk/wv/wo; the router, norms, token embeddings and output head stay bf16 (the
  router decides which experts run and is tiny; the embeddings are read one row per token).
  "int8-experts" / "int4-experts" quantize the experts only and keep attention in bf16 too.
  For the 8x22B the experts are 96% of the parameters, attention 3.5% (10 GB in bf16): with
  attention in bf16, int8 needs 135.9 GiB and int4 74.9 GiB, which leaves too little of an H200
  / H100 for a useful KV cache; quantizing attention as well gives the 131 GiB / 68 GiB of the
  design notes.
- KV cache: keys and values of every layer, in bf16, for max_slots x max_seq_len positions
  (KVCache allocates exactly this up front).
- Workspace: the peak activations of one forward step of `tokens_per_step` tokens on the
  reference path (residual stream, q/k/v, routed expert activations, float32 logits, each
  row's keys/values read back and expanded to all query heads) plus, for quantized formats,
  one expert's three matrices dequantized to bf16. Fused kernels need less: an upper bound.
- Reserve: the CUDA context, cuBLAS workspaces and allocator fragmentation, 1 GiB unless told.
- Several ranks (`ranks` = W GPUs, parallel.py): every number is one rank's, planned against
  one GPU's memory. A rank holds E/W experts and H/W query heads, K/W kv heads of attention
  (wq/wk/wv split by rows, wo by columns, each part quantized on its own: int8 scales per
  row, int4 groups within a row), and a whole copy of the router, norms, embeddings and output
  head; its KV cache holds its K/W kv heads. Its workspace has 1/W of the attention
  activations; the routed-expert and logits terms stay whole (all of a step's tokens may pick
  this rank's experts; the output head is replicated).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from local_backend.config import ModelConfig

GiB = 1024**3
MiB = 1024**2

DEVICE_MEMORY: dict[str, int] = {
    "h100-80gb": 81559 * MiB,  # "NVIDIA H100 80GB HBM3": 81559 MiB total in nvidia-smi
    "h200-141gb": 143771 * MiB,  # "NVIDIA H200": 143771 MiB total in nvidia-smi
}
DEVICE_ALIASES = {"h100": "h100-80gb", "h200": "h200-141gb"}
DEFAULT_RESERVE_BYTES = 1 * GiB


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int  # 16 = bf16 (no scales), 8 or 4 = quantized
    group_size: int | None  # inputs sharing one scale; None = one scale per output channel
    quantize_attention: bool  # besides the experts, which are always quantized when bits < 16
    scale_bytes: int = 2  # bf16 scales

    def matrix_bytes(self, rows: int, cols: int, quantized: bool = True) -> int:
        """Bytes of one [rows, cols] weight matrix (cols = inputs) in this format."""
        if self.bits == 16 or not quantized:
            return rows * cols * 2
        values = math.ceil(rows * cols * self.bits / 8)
        groups_per_row = 1 if self.group_size is None else math.ceil(cols / self.group_size)
        return values + rows * groups_per_row * self.scale_bytes


FORMATS: dict[str, WeightFormat] = {
    "bf16": WeightFormat("bf16", 16, None, quantize_attention=False),
    "int8": WeightFormat("int8", 8, None, quantize_attention=True),
    "int4": WeightFormat("int4", 4, 128, quantize_attention=True),
    "int8-experts": WeightFormat("int8-experts", 8, None, quantize_attention=False),
    "int4-experts": WeightFormat("int4-experts", 4, 128, quantize_attention=False),
}
DEFAULT_CANDIDATES = ("bf16", "int8", "int4")  # widest first


class DoesNotFitError(ValueError):
    """No candidate weight format fits the device with the asked context and slots."""


def get_format(fmt: str | WeightFormat) -> WeightFormat:
    if isinstance(fmt, WeightFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def device_memory_bytes(device: int | str | torch.device) -> int:
    """Bytes of memory: an int as given, a DEVICE_MEMORY name, or a torch device."""
    if isinstance(device, int):
        if device <= 0:
            raise ValueError(f"device memory must be positive, got {device}")
        return device
    if isinstance(device, str):
        key = DEVICE_ALIASES.get(device.lower(), device.lower())
        if key in DEVICE_MEMORY:
            return DEVICE_MEMORY[key]
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(
                f"unknown device {device!r}; give bytes, a torch device or one of "
                f"{', '.join(DEVICE_MEMORY)}"
            ) from None
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    raise ValueError(f"cannot tell the memory of device {device}")


# -- the three parts --------------------------------------------------------------------------


def _check_ranks(config: ModelConfig, ranks: int) -> None:
    uneven = [n for n in (config.n_heads, config.n_kv_heads, config.n_experts) if n % ranks]
    if ranks < 1 or uneven:
        raise ValueError(
            f"{config.name}: heads, kv heads and experts must split evenly over {ranks} ranks"
        )


def weight_bytes(config: ModelConfig, fmt: str | WeightFormat, ranks: int = 1) -> int:
    """Bytes of all parameters (what the device holds once the model is loaded); with
    `ranks`, what one rank holds (see the module docstring)."""
    _check_ranks(config, ranks)
    f = get_format(fmt)
    D, I, E = config.dim, config.intermediate, config.n_experts
    q_dim, kv_dim = config.q_dim // ranks, config.kv_dim // ranks  # this rank's heads
    experts = E // ranks * (2 * f.matrix_bytes(I, D) + f.matrix_bytes(D, I))  # w1, w3; w2
    q_att = f.quantize_attention
    attention = f.matrix_bytes(q_dim, D, q_att) + f.matrix_bytes(D, q_dim, q_att)  # wq, wo
    attention += 2 * f.matrix_bytes(kv_dim, D, q_att)  # wk, wv [kv_dim, D]
    router_and_norms = (E * D + 2 * D) * 2
    per_layer = experts + attention + router_and_norms
    return config.n_layers * per_layer + config.embedding_parameters() * 2 + config.dim * 2


def active_weight_bytes(config: ModelConfig, fmt: str | WeightFormat) -> int:
    """Bytes of weights read to decode one token alone: top_k experts per layer, attention,
    router, norms and the output head (the embedding table is read one row: negligible)."""
    f = get_format(fmt)
    D, I = config.dim, config.intermediate
    unused_experts = config.n_experts - config.top_k
    unused = unused_experts * (2 * f.matrix_bytes(I, D) + f.matrix_bytes(D, I))
    embeddings = config.vocab_size * D * 2
    return weight_bytes(config, f) - config.n_layers * unused - embeddings


def kv_cache_bytes(
    config: ModelConfig, max_seq_len: int, max_slots: int, dtype_bytes: int = 2, ranks: int = 1
) -> int:
    """Bytes of KVCache(config, max_slots, max_seq_len): k and v for every layer (of one
    rank's kv heads with `ranks`)."""
    per_token = 2 * config.n_layers * config.kv_dim // ranks * dtype_bytes
    return per_token * max_seq_len * max_slots


def workspace_bytes(
    config: ModelConfig,
    fmt: str | WeightFormat,
    max_seq_len: int,
    max_slots: int,
    tokens_per_step: int,
    ranks: int = 1,
) -> int:
    """Peak activations of one forward step (see the module docstring), in bytes."""
    f = get_format(fmt)
    D, I, V = config.dim, config.intermediate, config.vocab_size
    q_dim, kv_dim = config.q_dim // ranks, config.kv_dim // ranks  # this rank's heads
    N = max(tokens_per_step, max_slots)  # a prefill chunk, or one token per live slot
    rows = max_slots  # rows of a batch; each reads back its keys/values
    act = 2  # bf16 activations
    residual = 4 * N * D * act  # residual stream, normed input, attention output, block output
    qkv = N * (2 * q_dim + 2 * kv_dim) * act  # q, k, v and attention output
    kv_read = 2 * rows * max_seq_len * q_dim * act  # keys, values expanded to H heads
    moe = N * config.top_k * (2 * D + 2 * I) * act + 2 * N * config.n_experts * 4
    logits = N * V * (act + 4)  # output head result and its float32 copy
    dequant = 0 if f.bits == 16 else 3 * I * D * act  # one expert's w1, w2, w3 in bf16
    return residual + qkv + kv_read + moe + logits + dequant


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    format: str
    device_bytes: int
    weights: int
    kv_cache: int
    workspace: int
    reserve: int
    max_seq_len: int
    max_slots: int
    kv_bytes_per_token: int
    ranks: int = 1  # GPUs the model is split over; every byte count above is one rank's

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    @property
    def spare(self) -> int:
        """Bytes left over (negative when it does not fit)."""
        return self.device_bytes - self.total

    @property
    def max_cached_tokens(self) -> int:
        """Cache positions (over all slots) the device could hold beside weights, workspace
        and reserve: what bounds the context the local route can advertise."""
        room = self.device_bytes - self.weights - self.workspace - self.reserve
        return max(0, room // self.kv_bytes_per_token)

    @property
    def reason(self) -> str:
        per_rank = f"per rank of {self.ranks}: " if self.ranks > 1 else ""
        return per_rank + self._reason()

    def _reason(self) -> str:
        parts = (
            f"{_gib(self.weights)} weights ({self.format}) + {_gib(self.kv_cache)} KV cache "
            f"({self.max_slots} x {self.max_seq_len} tokens) + {_gib(self.workspace)} workspace "
            f"+ {_gib(self.reserve)} reserve = {_gib(self.total)}"
        )
        if self.fits:
            return (
                f"fits: {parts} of {_gib(self.device_bytes)} ({_gib(self.spare)} spare; room "
                f"for {self.max_cached_tokens} cached tokens)"
            )
        if self.weights > self.device_bytes:
            return (
                f"does not fit: the {self.format} weights alone need {_gib(self.weights)} of "
                f"{_gib(self.device_bytes)}"
            )
        return (
            f"does not fit: {parts} exceeds {_gib(self.device_bytes)} by {_gib(-self.spare)} "
            f"(room for {self.max_cached_tokens} cached tokens)"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def plan(
    config: ModelConfig,
    device_memory: int | str | torch.device,
    weight_format: str | WeightFormat = "bf16",
    max_seq_len: int = 4096,
    max_slots: int = 1,
    tokens_per_step: int = 2048,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    ranks: int = 1,
) -> MemoryPlan:
    """The memory a model in `weight_format` needs on a device, and whether it fits; with
    `ranks`, one rank's share on each of `ranks` such devices."""
    if max_seq_len <= 0 or max_slots <= 0 or tokens_per_step <= 0:
        raise ValueError("max_seq_len, max_slots and tokens_per_step must be positive")
    f = get_format(weight_format)
    return MemoryPlan(
        model=config.name,
        format=f.name,
        device_bytes=device_memory_bytes(device_memory),
        weights=weight_bytes(config, f, ranks),
        kv_cache=kv_cache_bytes(config, max_seq_len, max_slots, ranks=ranks),
        workspace=workspace_bytes(config, f, max_seq_len, max_slots, tokens_per_step, ranks),
        reserve=reserve_bytes,
        max_seq_len=max_seq_len,
        max_slots=max_slots,
        kv_bytes_per_token=kv_cache_bytes(config, 1, 1, ranks=ranks),
        ranks=ranks,
    )


def choose_format(
    config: ModelConfig,
    device_memory: int | str | torch.device,
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
    override: str | None = None,
    **plan_kwargs: int,
) -> MemoryPlan:
    """The plan of the first (widest) candidate format that fits; `override` forces one.

    With an override the plan is returned whether or not it fits (the caller asked for it and
    reads `.fits`); otherwise DoesNotFitError lists why each candidate failed.
    """
    if override is not None:
        return plan(config, device_memory, override, **plan_kwargs)
    plans = [plan(config, device_memory, name, **plan_kwargs) for name in candidates]
    for p in plans:
        if p.fits:
            return p
    reasons = "; ".join(f"{p.format}: {p.reason}" for p in plans)
    raise DoesNotFitError(f"{config.name} does not fit this device in any format: {reasons}")


def decode_tokens_per_s_bound(
    config: ModelConfig, fmt: str | WeightFormat, bandwidth_bytes_per_s: float
) -> float:
    """Batch-1 decode speed limit: bandwidth / bytes of weights read per token."""
    return bandwidth_bytes_per_s / active_weight_bytes(config, fmt)
