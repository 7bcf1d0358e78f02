"""How much quantization changes a model's predictions: top-1 agreement and KL to bf16.

    evaluate_quantization(model, prompts, formats) -> [QualityReport]   the measurement
    package_text() / train_byte_model(...)   a small real model to measure it on, trained on
        a text that an installed package ships (no downloads), used by the tests and by
        bench/quant_quality.py

Random weights alone flatter or punish quantization arbitrarily (their logits have no structure
to preserve), so the numbers that matter come from a model that has learnt something: a
Mixtral-architecture byte-level model trained for a few hundred steps on a license text.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from local_backend.config import ModelConfig
from local_backend.kv_cache import KVCache
from local_backend.model import Transformer

TEXT_PACKAGES = ("numpy", "torch", "triton", "pillow")  # candidates, best first
MIN_TEXT_BYTES = 20_000


def package_text(min_bytes: int = MIN_TEXT_BYTES) -> tuple[str, bytes]:
    """(where it came from, contents) of the largest LICENSE/COPYING file of the first
    installed package in TEXT_PACKAGES that ships one of at least `min_bytes`."""
    for package in TEXT_PACKAGES:
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        licenses = [f for f in files if f.name.upper().startswith(("LICENSE", "COPYING"))]
        best: tuple[int, bytes, str] | None = None
        for file in licenses:
            path = file.locate()
            try:
                data = path.read_bytes()  # type: ignore[attr-defined]
            except OSError:
                continue
            if best is None or len(data) > best[0]:
                best = (len(data), data, f"{package}: {file}")
        if best is not None and best[0] >= min_bytes:
            return best[2], best[1]
    raise FileNotFoundError(f"no package in {TEXT_PACKAGES} ships a {min_bytes}-byte license")


def byte_config(dim: int = 128, n_layers: int = 2, intermediate: int = 256) -> ModelConfig:
    """A Mixtral-shaped config over bytes (vocab 256): 8 experts, top-2, GQA 4:2 heads."""
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        intermediate=intermediate,
        vocab_size=256,
        max_seq_len=256,
        name=f"bytes-{dim}x{n_layers}",
    )


def _full_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of whole sequences (prefill into a throwaway cache)."""
    B, T = tokens.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, T, dtype=dtype)
    positions = torch.arange(T).expand(B, T)
    return model(tokens, positions, cache, torch.arange(B))


def train_byte_model(
    text: bytes,
    config: ModelConfig | None = None,
    steps: int = 300,
    batch: int = 16,
    seq_len: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[Transformer, list[float]]:
    """Train a Transformer on the first 90% of `text` (bytes as tokens); returns the model
    (fp32, eval) and its training losses. One torch thread: at these sizes threads only add
    overhead on a shared CPU."""
    config = config or byte_config()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(text[: int(len(text) * 0.9)]), dtype=torch.uint8).long()
    model = Transformer.from_config(config).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    losses = []
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
            window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
            logits = _full_forward(model, window[:, :-1])  # [B, T, V]
            loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return model.eval().requires_grad_(False), losses


def held_out_prompts(text: bytes, count: int, length: int) -> torch.Tensor:
    """`count` evenly spaced windows of `length` bytes from the last 10% of `text`: [P, T]."""
    tail = text[int(len(text) * 0.9) :]
    if len(tail) < length + count:
        raise ValueError("text too short for that many prompts")
    step = (len(tail) - length) // count
    rows = [list(tail[i * step : i * step + length]) for i in range(count)]
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class QualityReport:
    format: str
    top1_agreement: float  # share of positions where the argmax matches bf16's
    mean_kl: float  # mean KL(p_bf16 || p_quantized) in nats per position
    positions: int

    def row(self) -> str:
        return f"| {self.format} | {self.top1_agreement:.4f} | {self.mean_kl:.2e} |"


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || other)) over all positions of [..., V] logits."""
    ref = reference.float().flatten(0, -2)  # [positions, V]
    oth = other.float().flatten(0, -2)
    agreement = (ref.argmax(-1) == oth.argmax(-1)).float().mean().item()
    log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(oth, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return agreement, max(0.0, kl)


def evaluate_quantization(
    model: Transformer,
    prompts: torch.Tensor,
    formats: Sequence[str] = ("int8", "int4"),
    dtype: torch.dtype = torch.bfloat16,
) -> list[QualityReport]:
    """Each format's predictions on `prompts` [P, T] against the same model in `dtype` (bf16:
    what is served without quantization), every position of every prompt. Quantized copies
    are made from the bf16 weights, as at load, and run the torch backend."""
    from local_backend.quantize import quantize_model

    baseline = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        reference = _full_forward(baseline, prompts)
        reports = []
        for fmt in formats:
            quantized = copy.deepcopy(baseline)
            quantize_model(quantized, fmt, backend="torch")
            agreement, kl = compare_logits(reference, _full_forward(quantized, prompts))
            positions = math.prod(prompts.shape)
            reports.append(QualityReport(fmt, agreement, kl, positions))
    return reports
