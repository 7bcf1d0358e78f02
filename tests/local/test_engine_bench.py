"""The arithmetic of bench/engine_decode.py, checked here so the GPU run's figures can be
trusted: the fixed + per-layer fit, the bound's bytes, prefill FLOPs, and the layer-sharing
sub-model the 2-layer runs use."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from local_backend import memory_plan
from local_backend.config import ModelConfig
from local_backend.kv_cache import KVCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from engine_decode import Fit, active_bytes, build_model, first_layers, prefill_flops


def test_fit_recovers_fixed_and_per_layer() -> None:
    fit = Fit.of({6: 0.34 + 6 * 0.5, 2: 0.34 + 2 * 0.5})  # any order
    assert fit.fixed == pytest.approx(0.34) and fit.per_layer == pytest.approx(0.5)
    assert fit.at(56) == pytest.approx(0.34 + 28.0)


def test_bound_bytes_follow_memory_plan_and_the_head() -> None:
    config = ModelConfig.from_name("wizardlm-2-8x22b")
    assert active_bytes(config, "int4", False) == memory_plan.active_weight_bytes(config, "int4")
    saved = active_bytes(config, "int8", False) - active_bytes(config, "int8", True)
    head = config.vocab_size * config.dim
    assert saved == pytest.approx(head, rel=0.01)  # bf16 -> int8 halves the 2-byte head
    assert active_bytes(config, "bf16", True) == active_bytes(config, "bf16", False)


def test_prefill_flops() -> None:
    config = ModelConfig.from_name("wizardlm-2-8x22b")
    one = prefill_flops(config, 1)
    # one token: 2 FLOPs per active parameter, embeddings excluded, attention negligible
    active = config.active_parameters() - config.vocab_size * config.dim
    assert one == pytest.approx(2 * active, rel=0.01)
    # the expert matmuls of 4096 tokens (the 4.95 TFLOP per MoE layer) are inside
    experts = 2 * 4096 * 2 * 3 * config.dim * config.intermediate
    assert experts == pytest.approx(4.95e12, rel=0.01)
    assert prefill_flops(config, 4096) > 4096 * one  # plus the causal attention
    assert prefill_flops(config, 4096) >= config.n_layers * experts


def test_first_layers_shares_weights() -> None:
    config = dataclasses.replace(ModelConfig.from_name("tiny"), n_layers=3, vocab_size=256)
    model = build_model(config, "int8", torch.device("cpu"), torch.float32, "torch", False)
    sub = first_layers(model, 2)
    assert sub.config.n_layers == 2 and len(sub.layers) == 2 and len(model.layers) == 3
    assert sub.layers[1] is model.layers[1] and sub.output is model.output
    cache = KVCache(sub.config, 1, 8, dtype=torch.float32)
    tokens, positions = torch.tensor([[5, 6]]), torch.tensor([[0, 1]])
    logits = sub(tokens, positions, cache, torch.tensor([0]))
    assert logits.shape == (1, 2, 256) and bool(torch.isfinite(logits).all())
