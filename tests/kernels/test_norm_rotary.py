"""RMSNorm (plain and fused with the residual add) and in-place rotary against references;
the references against the model's own modules (the contract the kernels stand in for)."""

from __future__ import annotations

import pytest
import torch

from local_backend.kernels import reference
from local_backend.kernels.rmsnorm import add_rms_norm, rms_norm
from local_backend.kernels.rotary import apply_rotary_
from local_backend.model import RMSNorm, apply_rotary, rope_cos_sin

from .helpers import BF16, FP32, assert_near, requires_triton, tol

DTYPES = [torch.float32, torch.bfloat16]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 96)])  # one row; a non-power-of-two width
def test_rms_norm(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape).to(dtype)
    weight = (torch.rand(shape[-1]) + 0.5).to(dtype)
    out = rms_norm(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    assert_near(out, reference.rms_norm(x, weight, 1e-5), tol(dtype))


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_residual_in_place(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 96).to(dtype)
    residual = torch.randn(2, 3, 96).to(dtype)
    weight = (torch.rand(96) + 0.5).to(dtype)
    expected_norm, expected_sum = reference.add_rms_norm(x, residual, weight, 1e-5)
    storage = residual.data_ptr()
    normed, summed = add_rms_norm(x, residual, weight, 1e-5)
    assert summed.data_ptr() == storage  # the sum replaced the residual, no new buffer
    assert_near(summed, expected_sum, tol(dtype))
    assert_near(normed, expected_norm, tol(dtype))


def test_reference_norm_is_the_models() -> None:
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 96)
    assert_near(reference.rms_norm(x, norm.weight, 1e-5), norm(x), FP32)


def test_add_rms_norm_rejects_a_mismatched_residual() -> None:
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 4), torch.ones(8), 1e-5)


HEAD_DIM = 32


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place(dtype: torch.dtype) -> None:
    cos, sin = reference.rotary_tables(4096, HEAD_DIM, 1e6)
    positions = torch.tensor([0, 1, 7, 4095, -1, 300])  # -1: padding, left as it is
    q = torch.randn(6, 6, HEAD_DIM).to(dtype)  # 6 query heads (not a power of two)
    k = torch.randn(6, 2, HEAD_DIM).to(dtype)
    expected_q = reference.apply_rotary(q, positions, cos, sin)
    expected_k = reference.apply_rotary(k, positions, cos, sin)
    padding_q = q[4].clone()
    apply_rotary_(q, k, positions, cos, sin)
    assert_near(q, expected_q, tol(dtype))
    assert_near(k, expected_k, tol(dtype))
    assert torch.equal(q[4], padding_q)
    assert not torch.equal(q[2], expected_q[2].roll(1, dims=-1))  # sanity: rotation mattered


@requires_triton
def test_rotary_on_strided_views_and_hf_tables() -> None:
    """q and k as views into one fused qkv buffer, and HF's [P, D] tables (halves repeated)."""
    positions = torch.tensor([3, 9, 0])
    qkv = torch.randn(3, 4 + 2 + 2, HEAD_DIM)  # [tokens, q heads + k heads + v heads, D]
    q, k = qkv[:, :4], qkv[:, 4:6]
    angles = torch.outer(
        torch.arange(16).float(), 1e6 ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    )
    hf_cos = torch.cat((angles.cos(), angles.cos()), dim=-1)  # [P, D]
    hf_sin = torch.cat((angles.sin(), angles.sin()), dim=-1)
    expected_q = reference.apply_rotary(q, positions, angles.cos(), angles.sin())
    v_before = qkv[:, 6:].clone()
    apply_rotary_(q, k, positions, hf_cos, hf_sin)
    assert_near(qkv[:, :4], expected_q, FP32)
    assert torch.equal(qkv[:, 6:], v_before)  # v untouched


def test_reference_rotary_is_the_models() -> None:
    """reference.apply_rotary (half-split pairs) equals model.apply_rotary (rotate_half)."""
    positions = torch.tensor([[0, 5, 17, 1000]])  # [B, T]
    x = torch.randn(1, 4, 3, HEAD_DIM)  # [B, T, heads, D]
    cos, sin = rope_cos_sin(positions, HEAD_DIM, 1e6, torch.float32)
    table_cos, table_sin = reference.rotary_tables(1001, HEAD_DIM, 1e6)
    ours = reference.apply_rotary(x[0], positions[0], table_cos, table_sin)
    assert_near(ours, apply_rotary(x, cos, sin)[0], FP32)


@pytest.mark.gpu
@requires_triton
def test_norm_and_rotary_8x22b_shapes_gpu() -> None:
    """Hidden 6144 (one 8192-wide block per row), 48 + 8 heads of 128, on CUDA in bf16."""
    device = torch.device("cuda")
    x = torch.randn(64, 6144, device=device, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.rand(6144, device=device, dtype=torch.bfloat16) + 0.5
    expected_norm, expected_sum = reference.add_rms_norm(x, residual, weight, 1e-5)
    normed, summed = add_rms_norm(x, residual, weight, 1e-5)
    assert_near(summed, expected_sum, BF16)
    assert_near(normed, expected_norm, BF16)
    cos, sin = reference.rotary_tables(65536, 128, 1e6, device=device)
    positions = torch.randint(-1, 65536, (64,), device=device)
    q = torch.randn(64, 48, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(64, 8, 128, device=device, dtype=torch.bfloat16)
    expected_q = reference.apply_rotary(q, positions, cos, sin)
    expected_k = reference.apply_rotary(k, positions, cos, sin)
    apply_rotary_(q, k, positions, cos, sin)
    assert_near(q, expected_q, BF16)
    assert_near(k, expected_k, BF16)
