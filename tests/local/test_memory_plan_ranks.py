"""memory_plan over several GPUs: one rank's bytes (checked against rank shards of the real
8x22B built on the meta device) and what it picks on 2x H200, 4x H100 and 2x H100."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from local_backend.config import ModelConfig
from local_backend.kv_cache import KVCache
from local_backend.memory_plan import (
    GiB,
    choose_format,
    device_memory_bytes,
    kv_cache_bytes,
    plan,
    weight_bytes,
)
from local_backend.model import Transformer
from local_backend.parallel import ParallelContext
from local_backend.parallel_serve import plan_rank

WIZARD = ModelConfig.from_name("wizardlm-2-8x22b")
H100, H200 = "h100-80gb", "h200-141gb"
SERVING = {"max_seq_len": 4096, "max_slots": 8}  # `serve`'s defaults


def _bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _shard(config: ModelConfig, rank: int, ranks: int) -> Transformer:
    return Transformer.from_config(
        config, device="meta", dtype=torch.bfloat16, parallel=ParallelContext(rank, ranks)
    )


@pytest.mark.parametrize("ranks", [2, 4])
def test_bf16_bytes_per_rank_equal_a_rank_shard(ranks: int) -> None:
    per_rank = weight_bytes(WIZARD, "bf16", ranks=ranks)
    for rank in (0, ranks - 1):
        assert _bytes(_shard(WIZARD, rank, ranks)) == per_rank
    # what every rank holds whole: embeddings, output head, routers and norms
    shard = _shard(WIZARD, 0, ranks)
    whole = sum(
        p.numel() * 2
        for name, p in shard.named_parameters()
        if shard.parallel.tensor_split(name, tuple(p.shape)) is None
    )
    assert ranks * per_rank == weight_bytes(WIZARD, "bf16") + (ranks - 1) * whole
    assert 0.7 * GiB < whole < 0.8 * GiB  # 0.3% of the 262 GiB: why it is replicated


def test_int8_bytes_per_rank_equal_a_quantized_rank_shard() -> None:
    from local_backend.quantize import quantize_model

    # the real sizes with 2 of the 56 layers (each layer is alike; quantizing 56 is slow)
    two_layers = dataclasses.replace(WIZARD, n_layers=2)
    for rank in (0, 1):
        shard = _shard(two_layers, rank, 2)
        quantize_model(shard, "int8", backend="torch")
        assert _bytes(shard) == weight_bytes(two_layers, "int8", ranks=2)


@pytest.mark.parametrize("ranks", [2, 4])
def test_kv_cache_per_rank_equals_a_rank_cache(ranks: int) -> None:
    kv_heads = _shard(WIZARD, 0, ranks).cache_kv_heads
    cache = KVCache(WIZARD, 2, 1024, device="meta", kv_heads=kv_heads)
    assert cache.nbytes == kv_cache_bytes(WIZARD, 1024, 2, ranks=ranks)
    assert cache.nbytes * ranks == kv_cache_bytes(WIZARD, 1024, 2)


@pytest.mark.parametrize(
    ("gpu", "ranks", "picked"),
    [(H200, 2, "bf16"), (H100, 4, "bf16"), (H100, 2, "int8"), (H200, 4, "bf16")],
)
def test_what_the_plan_picks_on_several_gpus(gpu: str, ranks: int, picked: str) -> None:
    for sizes in ({"max_seq_len": 4096, "max_slots": 1}, SERVING):
        chosen = choose_format(WIZARD, gpu, ranks=ranks, **sizes)
        assert (chosen.format, chosen.fits, chosen.ranks) == (picked, True, ranks)
        assert chosen.reason.startswith(f"per rank of {ranks}: fits")
        assert chosen.device_bytes == device_memory_bytes(gpu)  # one GPU's memory


def test_bf16_does_not_fit_two_h100s_and_one_gpu_is_unchanged() -> None:
    two_h100 = plan(WIZARD, H100, "bf16", ranks=2, **SERVING)
    assert not two_h100.fits and "weights alone need 131.3 GiB" in two_h100.reason
    assert choose_format(WIZARD, H100).format == "int4"
    assert choose_format(WIZARD, H200).format == "int8"
    assert plan(WIZARD, H200, "int8") == plan(WIZARD, H200, "int8", ranks=1)
    with pytest.raises(ValueError, match="split evenly over 3 ranks"):
        weight_bytes(WIZARD, "bf16", ranks=3)


def test_cpu_ranks_share_the_host_memory() -> None:
    tiny = ModelConfig.from_name("tiny")
    one = plan_rank(tiny, torch.device("cpu"), torch.float32, 256, 2, ranks=1)
    two = plan_rank(tiny, torch.device("cpu"), torch.float32, 256, 2, ranks=2)
    assert two.device_bytes == device_memory_bytes("cpu") // 2 == one.device_bytes // 2
    assert two.format == "float32" and two.weights == weight_bytes(tiny, "bf16", ranks=2) * 2
