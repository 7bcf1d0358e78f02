"""rotary_write_kv_ (decode's rotary + cache write in one launch) equals the two kernels it
replaces, apply_rotary_ then write_kv_, on views of a fused qkv row, with padding rows."""

from __future__ import annotations

import pytest
import torch

from local_backend.kernels.decode_attention import write_kv_
from local_backend.kernels.rotary import apply_rotary_, rotary_write_kv_

from .helpers import requires_triton


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_write_kv_equals_rotary_then_write(dtype: torch.dtype) -> None:
    tokens, heads, kv_heads, dim = 3, 6, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)  # one fused GEMV row
    q_end, k_end = heads * dim, (heads + kv_heads) * dim
    cos, sin = torch.randn(tokens, dim).to(dtype), torch.randn(tokens, dim).to(dtype)
    positions = torch.tensor([4, -1, 9], dtype=torch.int32)  # row 1 is padding
    slots = torch.tensor([2, 0, 1], dtype=torch.int32)
    caches = [torch.randn(3, 16, kv_heads, dim).to(dtype) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]

    fused = qkv.clone()
    q = fused[:, :q_end].view(tokens, heads, dim)
    k = fused[:, q_end:k_end].view(tokens, kv_heads, dim)
    v = fused[:, k_end:].view(tokens, kv_heads, dim)
    rotary_write_kv_(q, k, v, positions, slots, cos, sin, *caches)

    plain = qkv.clone()
    eq = plain[:, :q_end].view(tokens, heads, dim)
    ek = plain[:, q_end:k_end].view(tokens, kv_heads, dim)
    ev = plain[:, k_end:].view(tokens, kv_heads, dim)
    rows = torch.where(positions >= 0, torch.arange(tokens, dtype=torch.int32), -1)
    apply_rotary_(eq, ek, rows, cos, sin)
    write_kv_(*expected_caches, ek, ev, slots, positions)

    assert torch.equal(q, eq)  # q rotated in place alike (padding row untouched)
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    assert not torch.equal(caches[0][2, 4], torch.zeros_like(caches[0][2, 4]))
