"""Flash-decoding over the KV cache and the cache write, against the torch references; the
reference against the model's attention at decode."""

from __future__ import annotations

from typing import cast

import pytest
import torch

from local_backend.kernels import reference
from local_backend.kernels.decode_attention import choose_num_splits, decode_attention, write_kv_
from local_backend.kv_cache import KVCache
from local_backend.model import Attention, Transformer, rope_cos_sin

from .helpers import BF16, FP32, assert_near, requires_triton, tiny_config, tol

SLOTS, MAX_LEN, N_KV, HEAD_DIM, N_HEADS = 4, 300, 2, 32, 6  # GQA: 3 query heads per KV head


def make_cache(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(SLOTS, MAX_LEN, N_KV, HEAD_DIM).to(dtype)
    v = torch.randn(SLOTS, MAX_LEN, N_KV, HEAD_DIM).to(dtype)
    return k, v


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3, None])  # one split, several, the heuristic
def test_decode_attention(dtype: torch.dtype, num_splits: int | None) -> None:
    k_cache, v_cache = make_cache(dtype)
    q = torch.randn(5, N_HEADS, HEAD_DIM).to(dtype)
    slots = torch.tensor([3, 0, 1, 2, 0])  # any slot order; two rows may read one slot
    lengths = torch.tensor([MAX_LEN, 1, 0, 65, 129])  # full, a single key, empty, ragged
    out = decode_attention(q, k_cache, v_cache, slots, lengths, num_splits=num_splits)
    expected = reference.decode_attention(q, k_cache, v_cache, slots, lengths)
    assert out.shape == q.shape and out.dtype == dtype
    assert_near(out, expected, tol(dtype))
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # length 0 attends to nothing


@requires_triton
def test_decode_attention_single_sequence_many_splits() -> None:
    """Batch 1 (the bandwidth-bound case flash-decoding exists for) with splits of one block."""
    k_cache, v_cache = make_cache(torch.float32)
    q = torch.randn(1, N_HEADS, HEAD_DIM)
    slots, lengths = torch.tensor([2]), torch.tensor([257])
    out = decode_attention(q, k_cache, v_cache, slots, lengths, num_splits=5)
    assert_near(out, reference.decode_attention(q, k_cache, v_cache, slots, lengths), FP32)


def test_num_splits_heuristic() -> None:
    cpu = torch.device("cpu")
    assert choose_num_splits(64, 8, 4096, cpu) == 1  # plenty of (sequence, head) programs
    assert choose_num_splits(1, 1, 100_000, cpu) > 1  # one long sequence: split it
    assert choose_num_splits(1, 1, 100, cpu) == 1  # too short to be worth a split


@requires_triton
def test_write_kv_skips_padding() -> None:
    k_cache, v_cache = make_cache(torch.float32)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(4, N_KV, HEAD_DIM), torch.randn(4, N_KV, HEAD_DIM)
    slots, positions = torch.tensor([1, 3, 0, 1]), torch.tensor([0, 299, -1, 17])
    write_kv_(k_cache, v_cache, k, v, slots, positions)
    reference.write_kv(k_expected, v_expected, k, v, slots, positions)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    assert torch.equal(k_cache[3, 299], k[1])


def test_reference_is_the_models_decode_attention() -> None:
    """reference.decode_attention over a cache = model.Attention at T = 1 (after its write)."""
    config = tiny_config()
    torch.manual_seed(0)
    model = Transformer.from_config(config)
    attention = cast(Attention, model.layers[1].attention)
    cache = KVCache(config, 3, 64, dtype=torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    x = torch.randn(2, 1, config.dim)
    positions, slots = torch.tensor([[9], [30]]), torch.tensor([2, 0])
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
    mask = model.attention_mask(positions, 31)
    expected = attention(x, cos, sin, mask, positions, cache, slots)  # writes k, v at 9 and 30
    half = config.head_dim // 2
    q = reference.apply_rotary(
        attention.wq(x).view(2, config.n_heads, config.head_dim),
        torch.arange(2),  # row b of the tables below holds token b's angles
        cos[:, 0, :half],  # [B, 1, Dh] -> [B, Dh / 2]: HF repeats the halves
        sin[:, 0, :half],
    )
    lengths = positions[:, 0] + 1
    out = reference.decode_attention(q, cache.k[1], cache.v[1], slots, lengths)
    assert_near(attention.wo(out.reshape(2, 1, -1)), expected, FP32)


@pytest.mark.gpu
@requires_triton
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_attention_8x22b_shapes_gpu(batch: int) -> None:
    """48 query heads over 8 KV heads of 128, a 16K-position cache, ragged lengths, on CUDA."""
    device = torch.device("cuda")
    k_cache = torch.randn(batch, 16384, 8, 128, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, 48, 128, device=device, dtype=torch.bfloat16)
    slots = torch.arange(batch, device=device).flip(0)
    lengths = torch.randint(1, 16385, (batch,), device=device)
    lengths[0] = 16384
    out = decode_attention(q, k_cache, v_cache, slots, lengths)
    expected = reference.decode_attention(q, k_cache, v_cache, slots, lengths)
    assert_near(out, expected, BF16)
