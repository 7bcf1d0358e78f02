"""Weight-only quantization of a model at load: what the engine calls to fit a device.

    load_quantized(path, device, fmt=None, backend=None, **plan_kwargs) -> (model, MemoryPlan)
        memory_plan.choose_format picks the widest format that fits (fmt overrides it), the
        loader quantizes each matrix as it arrives (LoadQuantizer: the bf16 model never
        exists whole on the device), then the kernel backend is installed.
    quantize_model(model, fmt, backend=None) -> QuantizationSummary
        the same for a model already in memory (tests, small models).
    LoadQuantizer(fmt): a weights.TensorTransform; .finalize(model) after loading.

Formats are memory_plan's: "bf16" (nothing quantized), "int8" / "int4" (experts w1/w2/w3 and
the attention projections wq/wk/wv/wo), "int8-experts" / "int4-experts" (experts only). The
router, norms, embeddings and output head stay in the load dtype. int8 is per-output-channel,
int4 is two values per byte with one scale per group of 128 inputs (kernels/quant.py).
Quantized experts are repacked as they arrive into the layout the packed MoE kernels stream
(kernels/packed.py) and become buffers of the MoE module, quantized projections QuantizedLinear
modules; the kernels read both (kernels/forwards.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from local_backend import memory_plan
from local_backend.config import ModelConfig
from local_backend.kernels import QuantizedLinear, install, select_backend
from local_backend.kernels.forwards import attach_expert_weight
from local_backend.kernels.packed import PackedWeight, repack
from local_backend.kernels.quant import (
    QuantizedWeight,
    int4_group_size,
    quantize_int4,
    quantize_int8,
)
from local_backend.load_progress import LoadProgress
from local_backend.model import Transformer

_EXPERT = re.compile(r"layers\.\d+\.block_sparse_moe\.(w1|w2|w3)")
_ATTENTION = re.compile(r"layers\.\d+\.attention\.(wq|wk|wv|wo)\.weight")
_HEAD = "output.weight"


@dataclass
class QuantizationSummary:
    format: str
    matrices: int  # stacked expert weights and projections quantized
    bytes_before: int  # of those matrices, in the dtype they arrived in
    bytes_after: int  # codes + scales

    def __str__(self) -> str:
        gib = 1024**3
        return (
            f"{self.format}: {self.matrices} matrices, {self.bytes_before / gib:.2f} GiB -> "
            f"{self.bytes_after / gib:.2f} GiB"
        )


def quantize_tensor(weight: torch.Tensor, bits: int, group_size: int | None) -> QuantizedWeight:
    """int8 (bits 8, per channel) or int4 (bits 4, grouped) codes of a [..., N, K] weight.

    A stacked [E, N, K] weight is quantized one expert at a time, so the fp32 temporaries
    stay the size of one expert (0.4 GB at 8x22B) rather than of the stack.
    """
    if bits not in (4, 8):
        raise ValueError(f"only 8- and 4-bit weights are supported, got {bits}")
    in_features = int(weight.shape[-1])
    group = int4_group_size(in_features, group_size or 128) if bits == 4 else None

    def one(w: torch.Tensor) -> QuantizedWeight:
        return quantize_int8(w) if bits == 8 else quantize_int4(w, group)

    if weight.dim() < 3:
        return one(weight)
    parts = [one(w) for w in weight]  # leading dim: one expert each
    first = parts[0]
    return QuantizedWeight(
        first.format,
        torch.stack([p.qweight for p in parts]),
        torch.stack([p.scales for p in parts]),
        first.group_size,
        first.in_features,
    )


class LoadQuantizer:
    """A `weights.TensorTransform`: quantizes each target parameter as the loader makes it.

    The loader stores the codes as the parameter; `finalize` moves them (with the scales kept
    here) into their final homes and installs the kernel backend.
    """

    def __init__(self, fmt: str, quantize_head: bool = False) -> None:
        self.format = memory_plan.get_format(fmt)
        # The output head stays bf16 unless asked (memory_plan counts it so): quantizing it
        # saves 2% of an int4 token's bytes and costs quality on every logit.
        self.quantize_head = quantize_head
        self.pending: dict[str, QuantizedWeight | PackedWeight] = {}
        self.summary = QuantizationSummary(self.format.name, 0, 0, 0)

    def targets(self, name: str) -> bool:
        if self.format.bits == 16:
            return False
        if _EXPERT.fullmatch(name):
            return True
        if name == _HEAD:
            return self.quantize_head and self.format.quantize_attention
        return self.format.quantize_attention and _ATTENTION.fullmatch(name) is not None

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not self.targets(name):
            return tensor
        quantized = quantize_tensor(tensor, self.format.bits, self.format.group_size)
        self.summary.matrices += 1
        self.summary.bytes_before += tensor.numel() * tensor.element_size()
        self.summary.bytes_after += quantized.nbytes
        if _EXPERT.fullmatch(name):
            # repacked now, one matrix at a time: doing it in finalize would hold every
            # layer's codes twice (the original layout, pending, beside the packed copy)
            packed = repack(quantized)
            self.pending[name] = packed
            return packed.codes
        self.pending[name] = quantized
        return quantized.qweight

    def finalize(self, model: Transformer, backend: str | None = None) -> QuantizationSummary:
        """Attach every pending quantized matrix to `model` and (re)install the kernels:
        `backend`, else the backend already installed, else select_backend's choice."""
        while self.pending:
            name = next(iter(self.pending))
            _attach(model, name, self.pending.pop(name))
        device = next(model.parameters()).device
        chosen = backend or getattr(model, "kernel_backend", None)
        install(model, select_backend(device, chosen))
        return self.summary


def _attach(model: Transformer, name: str, quantized: QuantizedWeight | PackedWeight) -> None:
    if match := _EXPERT.fullmatch(name):
        moe = model.get_submodule(name.rpartition(".")[0])
        attach_expert_weight(moe, match.group(1), quantized)
        return
    assert isinstance(quantized, QuantizedWeight)  # only experts are packed
    linear_name = name.removesuffix(".weight")  # layers.N.attention.wq
    parent_name, _, leaf = linear_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    if not isinstance(old, nn.Linear) or old.bias is not None:
        raise TypeError(f"{linear_name} is not a bias-free nn.Linear")
    setattr(parent, leaf, QuantizedLinear(quantized))


def quantize_model(
    model: Transformer, fmt: str, backend: str | None = None, quantize_head: bool = False
) -> QuantizationSummary:
    """Quantize a loaded model in place, one matrix at a time (each original is released as
    its codes replace it), then install the kernel backend (see LoadQuantizer.finalize).
    `quantize_head` quantizes the output head too (int8 / int4 formats only)."""
    quantizer = LoadQuantizer(fmt, quantize_head)
    for name, param in list(model.named_parameters()):
        if quantizer.targets(name):
            quantizer(name, param.data)
            _attach(model, name, quantizer.pending.pop(name))
    return quantizer.finalize(model, backend)


def plan_format(
    config: ModelConfig,
    device: torch.device | str | int,
    override: str | None = None,
    max_seq_len: int = 4096,
    max_slots: int = 1,
    tokens_per_step: int = 2048,
) -> memory_plan.MemoryPlan:
    """memory_plan.choose_format: the widest of bf16/int8/int4 that fits, or `override`."""
    return memory_plan.choose_format(
        config,
        device,
        override=override,
        max_seq_len=max_seq_len,
        max_slots=max_slots,
        tokens_per_step=tokens_per_step,
    )


def load_quantized(
    path: str | Path,
    device: torch.device | str = "cuda",
    fmt: str | None = None,
    backend: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_seq_len: int = 4096,
    max_slots: int = 1,
    tokens_per_step: int = 2048,
    progress: bool | LoadProgress = True,
) -> tuple[Transformer, memory_plan.MemoryPlan]:
    """Load a Hugging Face folder quantized to fit `device` (or to `fmt`), kernels installed.

    max_seq_len, max_slots and tokens_per_step describe the KV cache and the steps the engine
    means to run (memory_plan.plan): the format is chosen to leave room for them. A forced
    `fmt` that does not fit raises memory_plan.DoesNotFitError before anything is loaded.
    """
    config = ModelConfig.from_model_dir(path)
    plan = plan_format(config, torch.device(device), fmt, max_seq_len, max_slots, tokens_per_step)
    if not plan.fits:
        raise memory_plan.DoesNotFitError(plan.reason)
    quantizer = LoadQuantizer(plan.format)
    model = Transformer.from_model_dir(
        path, device=device, dtype=dtype, transform=quantizer, progress=progress
    )
    quantizer.finalize(model, backend)
    return model, plan
