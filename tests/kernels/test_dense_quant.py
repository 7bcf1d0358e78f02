"""The dense int8/int4 path (kernels/dense_quant.py): the repacked layout against quant.py's,
the kernel in each of its forms against the pure-torch reference (interpreter, tiny shapes,
ragged M, odd group counts, split-K), tuned configs read from data, and the whole tiny model
with quantized attention and head: triton equals torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch

from local_backend.kernels import QuantizedLinear, install, launch_configs
from local_backend.kernels import dense_quant as dq
from local_backend.kernels.quant import quantize_int4, quantize_int8, unpack_int4
from local_backend.model import Attention
from local_backend.quantize import quantize_model

from .helpers import BF16, FP32, assert_near, requires_triton, tiny_model
from .test_install import assert_same_logits, run_steps


def quantized(fmt: str, n: int, k: int, group: int = 32, lead: tuple[int, ...] = ()):
    w = torch.randn(*lead, n, k) * 0.05
    return quantize_int4(w, group_size=group) if fmt == "int4" else quantize_int8(w)


@pytest.mark.parametrize("lead", [(), (3,)])  # a stacked [E, N, K] weight repacks alike
def test_repack_int4_round_trips(lead: tuple[int, ...]) -> None:
    q = quantized("int4", 12, 96, group=32, lead=lead)  # 3 groups per row: an odd count
    codes, scales_t = dq.repack_int4(q.qweight, q.scales, q.group_size)
    assert codes.shape == q.qweight.shape and codes.dtype == torch.uint8
    assert scales_t.shape == (*lead, 3, 12) and scales_t.is_contiguous()
    assert torch.equal(dq.unpack_int4_repacked(codes, 32), unpack_int4(q.qweight))
    qweight, scales = dq.restore_int4(codes, scales_t, 32)
    assert torch.equal(qweight, q.qweight) and torch.equal(scales, q.scales)


def test_repacked_layout_splits_each_group_in_halves() -> None:
    """Byte j of a group: input j in the low nibble, input j + g/2 in the high one."""
    values = torch.arange(64).remainder(16).sub(8).float()[None, :]  # one row, 2 groups of 32
    q = quantize_int4(values, group_size=32, clip_ratios=(1.0,))
    codes, _ = dq.repack_int4(q.qweight, q.scales, 32)
    expected = (unpack_int4(q.qweight) + 8).to(torch.uint8)[0]  # [64]
    for group in range(2):
        block = codes[0, group * 16 : (group + 1) * 16]
        assert torch.equal(block & 0xF, expected[group * 32 : group * 32 + 16])
        assert torch.equal(block >> 4, expected[group * 32 + 16 : group * 32 + 32])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dense_weight_dequantizes_like_quant(fmt: str) -> None:
    q = quantized(fmt, 20, 96)
    dense = dq.DenseQuantWeight.from_quantized(q)
    assert torch.equal(dense.dequantize(), q.dequantize())
    assert torch.equal(dense.to_quantized().qweight, q.qweight)
    assert dense.nbytes == q.nbytes  # the repack moves bytes, adds none


# (rows, config): ragged M through each form; None = the heuristic
FORMS = [
    (1, dq.DenseConfig(block_m=1, block_n=16, block_k=32, split_k=1)),  # GEMV, dot-free
    (3, dq.DenseConfig(block_m=2, block_n=16, block_k=32, split_k=2)),  # + split-K, 2 M blocks
    (5, dq.DenseConfig(block_m=4, block_n=32, block_k=32, split_k=3)),  # a split per group
    (20, dq.DenseConfig(block_m=16, block_n=16, block_k=32, split_k=2)),  # GEMV with tl.dot
    (70, dq.DenseConfig(block_m=64, block_n=32, block_k=32)),  # prefill tile GEMM
    (7, None),
    (40, None),
]


@requires_triton
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize(("rows", "config"), FORMS)
def test_dense_linear_matches_reference(fmt: str, rows: int, config: dq.DenseConfig | None) -> None:
    q = quantized(fmt, 40, 96)  # N = 40: partial N tiles; K = 96: 3 groups of 32
    dense = dq.DenseQuantWeight.from_quantized(q)
    x = torch.randn(rows, 96)
    out = dq.dense_linear(x, dense, config)
    assert_near(out, dq.reference_linear(x, dense), FP32)
    assert not dq.split_counters(x.device).any()  # every split launch left its counters at 0


@requires_triton
def test_dense_linear_bf16_and_dequant_mode() -> None:
    dense = dq.DenseQuantWeight.from_quantized(quantized("int4", 24, 64))
    x = torch.randn(2, 3, 64).bfloat16()  # leading dims are flattened and restored
    for config in (None, dq.DenseConfig(mode="dequant")):
        out = dq.dense_linear(x, dense, config)
        assert out.shape == (2, 3, 24) and out.dtype == torch.bfloat16
        assert_near(out, dq.reference_linear(x, dense), BF16)


def test_config_checks() -> None:
    dense = dq.DenseQuantWeight.from_quantized(quantized("int4", 8, 64, group=16))
    with pytest.raises(ValueError, match="group size"):
        dq.check_config(dense, dq.DenseConfig(block_k=64))
    with pytest.raises(ValueError, match=r"tl\.dot"):
        dq.check_config(dense, dq.DenseConfig(block_m=16, block_k=16))
    # the heuristic never breaks its own rules, whatever the rows
    for rows in (1, 3, 16, 32, 64, 2048):
        dq.check_config(dense, dq.heuristic(dense, rows, torch.device("cpu")))


def test_tuned_config_is_read_from_data(tmp_path: Path) -> None:
    """A config file for this device wins over the heuristic, nearest bucket in log2(M); an
    invalid entry falls back to the heuristic."""
    dense = dq.DenseQuantWeight.from_quantized(quantized("int8", 40, 96))
    key = dq.shape_key(dense)
    tuned = {
        "1": dq.DenseConfig(block_m=1, block_n=32, block_k=32, split_k=3).as_dict(),
        "64": dq.DenseConfig(block_m=64, block_n=16, block_k=32).as_dict(),
        "4096": {"block_m": 3},  # not a power of two: invalid
    }
    device = torch.device("cpu")
    launch_configs.write_configs(dq.KERNEL, "cpu", "cpu", {key: tuned}, tmp_path)
    launch_configs.use_directory(tmp_path)
    try:
        assert dq.choose_config(dense, 1, device).split_k == 3
        assert dq.choose_config(dense, 2, device).block_n == 32  # nearer 1 than 64
        assert dq.choose_config(dense, 48, device).block_m == 64
        assert dq.choose_config(dense, 4096, device) == dq.heuristic(dense, 4096, device)
    finally:
        launch_configs.use_directory(None)
    assert dq.choose_config(dense, 1, device) == dq.heuristic(dense, 1, device)
    body = json.loads(launch_configs.config_path(dq.KERNEL, "cpu", tmp_path).read_text())
    assert body["kernel"] == dq.KERNEL and key in body["configs"]


def test_set_backend_repacks_and_restores() -> None:
    q = quantized("int4", 16, 64)
    linear = QuantizedLinear(q)
    before = (q.qweight.clone(), q.scales.clone())
    linear.set_backend("triton")
    assert linear.dense_layout and linear.scales.shape == (2, 16)
    assert torch.equal(linear.weight_view().qweight, before[0])
    linear.set_backend("torch")
    assert torch.equal(linear.qweight, before[0]) and torch.equal(linear.scales, before[1])


@requires_triton
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_model_with_head_triton_equals_torch(fmt: str) -> None:
    """Whole tiny model, attention and output head quantized: the dense kernels (decode GEMV
    and prefill GEMM) give the torch backend's logits."""
    model = tiny_model()
    quantize_model(model, fmt, backend="torch", quantize_head=True)
    assert isinstance(model.output, QuantizedLinear)
    expected = run_steps(model, decode_steps=1)
    install(model, "triton")
    attention = cast(Attention, model.layers[0].attention)
    assert cast(QuantizedLinear, attention.wq).dense_layout
    assert cast(QuantizedLinear, model.output).dense_layout
    assert_same_logits(run_steps(model, decode_steps=1), expected)


@pytest.mark.gpu
@requires_triton
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(6144, 6144), (1024, 6144), (32000, 6144)])
def test_dense_linear_8x22b_shapes_gpu(fmt: str, shape: tuple[int, int]) -> None:
    """Every form at the real shapes in bf16, the split-K counters included (run twice: the
    second launch must find them reset). Norm-wise bound: bf16 output rounding is 2^-8."""
    n, k = shape
    dense = dq.DenseQuantWeight.from_quantized(
        quantized(fmt, n, k, group=128) if fmt == "int4" else quantized(fmt, n, k)
    )
    dense = dq.DenseQuantWeight(dense.format, dense.codes.cuda(), dense.scales.cuda(),
                                dense.group_size, dense.in_features)  # fmt: skip
    for rows in (1, 3, 8, 32, 512, 4096):
        x = torch.randn(rows, k, device="cuda").bfloat16()
        expected = dq.reference_linear(x.float(), dense)
        for _ in range(2):
            out = dq.dense_linear(x, dense).float()
            error = (out - expected).norm() / expected.norm()
            assert error < 1e-2, f"M={rows}: relative error {error:.2e}"
    assert not dq.split_counters(torch.device("cuda")).any()


@requires_triton  # it installs the triton backend first (then checks the torch one undoes it)
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_install_fuses_qkv_into_views(fmt: str) -> None:
    """triton: wq, wk, wv become row views of one fused weight (no second copy); torch: the
    fused weight is dropped and the projections still hold the same values."""
    model = tiny_model()
    quantize_model(model, fmt, backend="torch")
    attention = cast(Attention, model.layers[0].attention)
    x = torch.randn(2, 1, 64)
    before = [attention.wq(x), attention.wk(x), attention.wv(x)]
    install(model, "triton")
    fused = attention.__dict__["qkv"]
    storage = fused.codes if isinstance(fused, dq.DenseQuantWeight) else fused
    assert storage.shape[0] == 64 + 2 * 32  # q_dim + 2 kv_dim rows
    first = attention.wq.qweight if fmt == "int4" else attention.wq.weight
    last = attention.wv.qweight if fmt == "int4" else attention.wv.weight
    assert first.data_ptr() == storage.data_ptr()
    assert last.data_ptr() == storage[96:].data_ptr()
    install(model, "torch")
    assert "qkv" not in attention.__dict__
    after = [attention.wq(x), attention.wk(x), attention.wv(x)]
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


@requires_triton
def test_quantizing_after_a_triton_install_refuses_the_stale_fused_weight() -> None:
    """install(triton) fuses the float q/k/v; quantizing afterwards (quantize-at-load reinstalls
    the backend it finds) must fuse the quantized projections, never keep the float copy."""
    model = tiny_model()
    install(model, "triton")
    attention = cast(Attention, model.layers[0].attention)
    assert isinstance(attention.__dict__["qkv"], torch.Tensor)
    quantize_model(model, "int4", backend="triton")
    fused = attention.__dict__["qkv"]
    assert isinstance(fused, dq.DenseQuantWeight)
    assert isinstance(attention.wq, QuantizedLinear)
    assert attention.wq.qweight.data_ptr() == fused.codes.data_ptr()
