"""int8 / int4 weight quantization: the formats' error bounds and layout, the dense
dequant-in-GEMM kernel against its reference, and quantizing a model (after and at load)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from local_backend import memory_plan
from local_backend.config import ModelConfig
from local_backend.kernels import QuantizedLinear, reference
from local_backend.kernels.forwards import expert_weights
from local_backend.kernels.quant import (
    dequant_matmul,
    int4_group_size,
    quantize,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from local_backend.model import Attention, MoE, Transformer
from local_backend.quantize import load_quantized, plan_format, quantize_model

from .helpers import BF16, FP32, assert_near, requires_triton, tiny_model


def test_int8_error_bound() -> None:
    w = torch.randn(48, 256) * 0.05
    q = quantize_int8(w)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (48,)
    assert int(q.qweight.abs().max()) <= 127
    assert bool((q.qweight.abs().amax(dim=1) == 127).all())  # each row's max uses the full range
    error = (w - q.dequantize()).abs()
    assert bool((error <= q.scales.float()[:, None] * 0.5 + 1e-7).all())  # round to nearest


def test_int4_layout() -> None:
    """Two codes per byte along K, even k in the low nibble, stored with a +8 offset."""
    codes = torch.randint(-7, 8, (4, 256))
    scales = torch.rand(4, 2) + 0.5  # two groups of 128
    w = codes.float() * scales.repeat_interleave(128, dim=1)
    q = quantize_int4(w, group_size=128, clip_ratios=(1.0,))
    assert q.qweight.shape == (4, 128) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == (4, 2) and q.scales.dtype == torch.float16
    low, high = (q.qweight & 0xF).long() - 8, (q.qweight >> 4).long() - 8
    recovered = unpack_int4(q.qweight).long()
    assert torch.equal(low, recovered[:, 0::2]) and torch.equal(high, recovered[:, 1::2])
    # a group whose absmax is code 7 reproduces the codes exactly (up to fp16 scale rounding)
    exact = (codes.view(4, 2, 128).abs().amax(-1) == 7).repeat_interleave(128, dim=1)
    assert torch.equal(recovered[exact], codes[exact])


def test_int4_error_bound_and_clip_search() -> None:
    w = torch.randn(64, 512) * 0.02
    plain = quantize_int4(w, clip_ratios=(1.0,))
    searched = quantize_int4(w)
    per_element_step = plain.scales.float().repeat_interleave(128, dim=1)
    assert bool(((w - plain.dequantize()).abs() <= per_element_step * 0.5 + 1e-7).all())
    # the clip search keeps a ratio only where it lowers the group's squared error
    plain_error = (w - plain.dequantize()).pow(2).sum()
    searched_error = (w - searched.dequantize()).pow(2).sum()
    assert searched_error < plain_error
    relative = (searched_error / w.pow(2).sum()).sqrt()
    assert 0.05 < relative < 0.15  # 4 bits on Gaussian weights: ~10% (a broken scale is >>)


@pytest.mark.parametrize(
    ("in_features", "group"), [(6144, 128), (16384, 128), (64, 64), (48, 16), (256, 128)]
)
def test_int4_group_size(in_features: int, group: int) -> None:
    assert int4_group_size(in_features) == group


def test_int4_group_size_rejects_odd_shapes() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        int4_group_size(24)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bytes_match_memory_plan(fmt: str) -> None:
    """Our storage is exactly what memory_plan budgets (codes + 2-byte scales)."""
    q = quantize(torch.randn(96, 1024), fmt)
    assert not isinstance(q, torch.Tensor)
    assert q.nbytes == memory_plan.FORMATS[fmt].matrix_bytes(96, 1024)


@requires_triton
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("n_rows", [1, 19])
def test_dequant_matmul_matches_reference(fmt: str, n_rows: int) -> None:
    weight = quantize(torch.randn(96, 256) * 0.06, fmt)  # N = 96: a partial N tile
    x = torch.randn(n_rows, 256)
    assert_near(dequant_matmul(x, weight), reference.quantized_matmul(x, weight), FP32)


@requires_triton
def test_dequant_matmul_bf16() -> None:
    weight = quantize(torch.randn(96, 256).bfloat16() * 0.06, "int4")
    x = torch.randn(3, 2, 256).bfloat16()  # leading dims are flattened and restored
    out = dequant_matmul(x, weight)
    assert out.shape == (3, 2, 96) and out.dtype == torch.bfloat16
    assert_near(out, reference.quantized_matmul(x, weight), BF16)


@pytest.mark.parametrize(("fmt", "attention"), [("int4", True), ("int8-experts", False)])
def test_quantize_model_replaces_weights(fmt: str, attention: bool) -> None:
    model = tiny_model()
    x = torch.randn(3, 64)
    moe = cast(MoE, model.layers[0].block_sparse_moe)
    w1 = moe.w1.detach().clone()
    summary = quantize_model(model, fmt, backend="torch")
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.endswith(("moe.w1", "moe.w2", "moe.w3")) for name in names)
    for layer in model.layers:
        assert isinstance(cast(Attention, layer.attention).wq, QuantizedLinear) == attention
    per_layer = 3 + (4 if attention else 0)
    assert summary.matrices == per_layer * len(model.layers)
    bits = 4 if fmt.startswith("int4") else 8
    assert summary.bytes_after < summary.bytes_before * (bits / 32 + 0.05)  # from fp32
    # the buffers hold the quantized experts: dequantized they are close to the originals
    q1 = expert_weights(moe)[0]
    assert not isinstance(q1, torch.Tensor)
    assert_close(q1.dequantize(), w1, atol=0.15 * float(w1.abs().max()), rtol=0)
    assert_close(x @ q1.dequantize()[0].t(), x @ w1[0].t(), atol=0.5, rtol=0.1)


def test_quantize_bf16_is_a_no_op() -> None:
    model = tiny_model()
    before = {name: p.clone() for name, p in model.named_parameters()}
    summary = quantize_model(model, "bf16", backend="torch")
    assert summary.matrices == 0
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert isinstance(cast(Attention, model.layers[0].attention).wq, nn.Linear)


def test_plan_picks_the_formats_of_the_design() -> None:
    """int8 fits one H200, int4 one H100 (design notes), through memory_plan.choose_format."""
    config = ModelConfig.from_name("wizardlm-2-8x22b")
    assert plan_format(config, "h200").format == "int8"
    assert plan_format(config, "h100").format == "int4"
    assert not plan_format(config, "h100", override="bf16").fits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral checkpoint written by transformers (the format real models ship in)."""
    pytest.importorskip("transformers")  # a dev dependency: `.[local]` alone has none
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    hf_config = MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("mixtral_quant")
    MixtralForCausalLM(hf_config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_load_quantized_equals_quantizing_after_load(checkpoint: Path) -> None:
    """Quantizing each tensor as the loader makes it gives exactly the buffers of quantizing
    the loaded bf16 model (the bf16 model never has to exist whole)."""
    loaded, plan = load_quantized(checkpoint, device="cpu", fmt="int4", backend="torch",
                                  progress=False)  # fmt: skip
    assert plan.format == "int4" and plan.fits
    after = Transformer.from_model_dir(checkpoint, dtype=torch.bfloat16, progress=False)
    quantize_model(after, "int4", backend="torch")
    buffers = dict(after.named_buffers())
    quantized = {n: b for n, b in loaded.named_buffers() if n.endswith(("qweight", "scales"))}
    assert len(quantized) == 2 * 7 * 2  # (codes, scales) x 7 matrices x 2 layers
    assert all(torch.equal(b, buffers[n]) for n, b in quantized.items())
    assert getattr(loaded, "kernel_backend", None) == "torch"


def test_load_quantized_lets_the_plan_choose(checkpoint: Path) -> None:
    model, plan = load_quantized(checkpoint, device="cpu", backend="torch", progress=False)
    expected = memory_plan.choose_format(model.config, torch.device("cpu")).format
    assert plan.format == expected == "bf16"  # a tiny model fits host memory unquantized
    assert isinstance(cast(MoE, model.layers[0].block_sparse_moe).w1, nn.Parameter)
