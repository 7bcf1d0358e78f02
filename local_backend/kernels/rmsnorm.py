"""RMSNorm in Triton, optionally fused with the residual add that precedes it.

In a decoder block every norm but the first follows a residual add; fusing them reads the two
inputs once and writes the sum and the normalised row in the same pass (one launch instead of
three elementwise passes). One program per row; a whole row (6144 at 8x22B) fits one block.
Rounding follows the torch reference: the sum is rounded to the activation dtype before the
norm, the norm runs in fp32 and is rounded to the activation dtype before the weight multiply.
"""

from __future__ import annotations

import torch

from .runtime import HAS_TRITON, check_device, next_power_of_2, tl, triton

if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, residual_ptr, weight_ptr, out_ptr,
        n_cols, stride_x, stride_r, stride_o, eps,
        ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """out = norm(x [+ residual]) * weight for one row; ADD_RESIDUAL writes the sum back
        into `residual`. Grid: (rows,)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        hidden = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if ADD_RESIDUAL:
            residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
            # add in fp32 and round once, as torch does for bf16 (and the interpreter needs:
            # its bf16 arithmetic is wrong)
            hidden = (hidden.to(tl.float32) + residual.to(tl.float32)).to(hidden.dtype)
            tl.store(residual_ptr + row * stride_r + cols, hidden, mask=mask)
        h32 = hidden.to(tl.float32)
        mean_square = tl.sum(h32 * h32, axis=0) / n_cols
        normed = (h32 * tl.rsqrt(mean_square + eps)).to(hidden.dtype)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        out = weight.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    check_device(x, weight)
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match rows of {n_cols}")
    rows = x.reshape(-1, n_cols)  # [R, C], R = all leading dims
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows.shape, device=x.device, dtype=out_dtype)
    res_rows = rows if residual is None else residual.view(-1, n_cols)  # in place: must be a view
    block = next_power_of_2(n_cols)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res_rows, weight, out, n_cols, rows.stride(0), res_rows.stride(0), out.stride(0),
        eps, ADD_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )  # fmt: skip
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim; matches reference.rms_norm."""
    return _launch(x, None, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is written into `residual` in place.

    `residual` must be contiguous in its last dim, of x's shape and dtype.
    """
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("residual must have x's shape and dtype")
    if not residual.is_contiguous():
        raise ValueError("residual is updated in place and must be contiguous")
    return _launch(x, residual, weight, eps), residual
