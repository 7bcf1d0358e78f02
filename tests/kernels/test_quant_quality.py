"""Quantized models predict like the bf16 model: top-1 agreement and mean KL(bf16 || quantized)
over a fixed prompt set, for int8 and int4 (experts and attention projections quantized, the
formats the memory plan picks for an H200 / H100).

Two models of the Mixtral architecture at dim 128 (so int4 groups are the real 128 inputs):
- random weights (the small config): logits with no structure, so small perturbations flip
  near-tied argmaxes: agreement is the harder number here, KL the easier one;
- the same config trained for 80 steps on a license text that numpy ships (byte tokens):
  peaked distributions, where quantization noise shows up in the KL.
bench/quant_quality.py runs a longer training and reports the figures in docs/benchmarks.md.

Thresholds (observed on this CPU in brackets; everything is seeded, so the run is
deterministic): int8 per-channel weights are within ~0.7% of bf16, so agreement >= 0.98
[0.99-1.0] and KL <= 1e-3 [1e-5-2e-4]; int4 with 128-groups is within ~10%, agreement
>= 0.90 [0.96-0.97] and KL <= 1e-2 [1e-4-2e-3]. Margins are 3-10x on KL and a few points of
agreement: loose enough for platform float differences, tight enough that a wrong scale, a
swapped nibble or a mis-grouped scale (all of which give KL > 0.1 and agreement < 0.5) fails.
"""

from __future__ import annotations

import pytest
import torch

from local_backend.model import Transformer
from local_backend.quant_quality import (
    QualityReport,
    byte_config,
    evaluate_quantization,
    held_out_prompts,
    package_text,
    train_byte_model,
)

THRESHOLDS = {"int8": (0.98, 1e-3), "int4": (0.90, 1e-2)}  # (min agreement, max mean KL)


@pytest.fixture(scope="module")
def text() -> bytes:
    return package_text()[1]


@pytest.fixture(scope="module")
def prompts(text: bytes) -> torch.Tensor:
    return held_out_prompts(text, count=8, length=64)  # 512 positions, text the model never saw


def check(reports: list[QualityReport]) -> None:
    by_format = {r.format: r for r in reports}
    assert set(by_format) == set(THRESHOLDS)
    for fmt, (min_agreement, max_kl) in THRESHOLDS.items():
        report = by_format[fmt]
        assert report.top1_agreement >= min_agreement, report
        assert 0.0 <= report.mean_kl <= max_kl, report
    assert by_format["int8"].mean_kl < by_format["int4"].mean_kl  # more bits, closer


def test_random_weight_model(prompts: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Transformer.from_config(byte_config(dim=128, n_layers=2, intermediate=256))
    check(evaluate_quantization(model, prompts, formats=("int8", "int4")))


def test_trained_model(text: bytes, prompts: torch.Tensor) -> None:
    config = byte_config(dim=128, n_layers=2, intermediate=256)
    model, losses = train_byte_model(text, config, steps=80, batch=8, seq_len=64, seed=0)
    # it learnt the text (uniform over bytes is ln 256 = 5.5): the check below is meaningful
    assert sum(losses[-10:]) / 10 < 3.2 < losses[0]
    check(evaluate_quantization(model, prompts, formats=("int8", "int4")))
