"""memory_plan: what the 8x22B needs at bf16/int8/int4 and which GPU each fits."""

from __future__ import annotations

import pytest
import torch

from local_backend.config import ModelConfig
from local_backend.kv_cache import KVCache
from local_backend.memory_plan import (
    DEVICE_MEMORY,
    FORMATS,
    DoesNotFitError,
    GiB,
    choose_format,
    decode_tokens_per_s_bound,
    device_memory_bytes,
    kv_cache_bytes,
    plan,
    weight_bytes,
)
from local_backend.model import Transformer

WIZARD = ModelConfig.from_name("wizardlm-2-8x22b")
H100, H200 = "h100-80gb", "h200-141gb"


def test_weight_sizes_of_the_8x22b() -> None:
    assert round(weight_bytes(WIZARD, "bf16") / 1e9) == 281  # 281 GB
    assert round(weight_bytes(WIZARD, "int8") / GiB) == 131  # 131 GiB
    assert round(weight_bytes(WIZARD, "int4") / GiB) == 68  # ~68 GiB
    # Keeping attention in bf16 costs a byte per attention parameter, less the int8 scales
    # (one bf16 per output row of wq, wk, wv, wo).
    attention_params = WIZARD.n_layers * WIZARD.attention_parameters()
    scale_bytes = WIZARD.n_layers * (WIZARD.q_dim + 2 * WIZARD.kv_dim + WIZARD.dim) * 2
    extra8 = weight_bytes(WIZARD, "int8-experts") - weight_bytes(WIZARD, "int8")
    assert extra8 == attention_params - scale_bytes


@pytest.mark.parametrize(
    ("fmt", "fits_h100", "fits_h200"),
    [("bf16", False, False), ("int8", False, True), ("int4", True, True)],
)
def test_which_gpu_each_format_fits(fmt: str, fits_h100: bool, fits_h200: bool) -> None:
    on_h100 = plan(WIZARD, H100, fmt, max_seq_len=4096, max_slots=1)
    on_h200 = plan(WIZARD, H200, fmt, max_seq_len=4096, max_slots=1)
    assert (on_h100.fits, on_h200.fits) == (fits_h100, fits_h200)
    for p in (on_h100, on_h200):
        assert p.reason.startswith("fits" if p.fits else "does not fit")
        assert p.total == p.weights + p.kv_cache + p.workspace + p.reserve


def test_choose_format_picks_the_widest_that_fits() -> None:
    assert choose_format(WIZARD, H100).format == "int4"
    assert choose_format(WIZARD, H200).format == "int8"
    assert choose_format(WIZARD, 400 * GiB).format == "bf16"
    forced = choose_format(WIZARD, H100, override="int8")
    assert forced.format == "int8" and not forced.fits
    with pytest.raises(DoesNotFitError, match=r"bf16: does not fit.*int8: .*int4: does not fit"):
        choose_format(WIZARD, 40 * GiB)


def test_long_context_changes_the_choice() -> None:
    # 8 slots of the full 64k context need 8 * 65536 * 224 KiB = 112 GiB of KV cache.
    long = plan(WIZARD, H200, "int8", max_seq_len=65536, max_slots=8)
    assert not long.fits and "exceeds" in long.reason and "weights alone" not in long.reason
    assert long.kv_cache == 8 * 65536 * 2 * 56 * 8 * 128 * 2
    assert choose_format(WIZARD, H200, max_seq_len=65536, max_slots=1).format == "int4"
    assert plan(WIZARD, H100, "int4").max_cached_tokens > 16384


def test_kv_cache_bytes_equal_the_allocated_cache() -> None:
    tiny = ModelConfig.from_name("tiny")
    cache = KVCache(tiny, max_slots=3, max_seq_len=40, dtype=torch.bfloat16)
    assert kv_cache_bytes(tiny, 40, 3) == cache.nbytes


def test_bf16_weight_bytes_equal_a_real_models_parameters() -> None:
    for name in ("tiny", "wizardlm-2-8x22b"):
        config = ModelConfig.from_name(name)
        model = Transformer.from_config(config, device="meta", dtype=torch.bfloat16)
        assert weight_bytes(config, "bf16") == sum(p.numel() * 2 for p in model.parameters())


def test_int4_groups_and_int8_channels_add_scales() -> None:
    fmt4, fmt8 = FORMATS["int4"], FORMATS["int8"]
    assert fmt4.matrix_bytes(16384, 6144) == 16384 * 6144 // 2 + 16384 * (6144 // 128) * 2
    assert fmt8.matrix_bytes(6144, 16384) == 6144 * 16384 + 6144 * 2
    assert fmt4.matrix_bytes(10, 10, quantized=False) == 200


def test_decode_speed_bound_matches_the_design_notes() -> None:
    # int4 at batch 1: about 170 tokens/s on an H100 (3.35 TB/s), about 240 on an H200 (4.8).
    assert 150 < decode_tokens_per_s_bound(WIZARD, "int4", 3.35e12) < 190
    assert 215 < decode_tokens_per_s_bound(WIZARD, "int4", 4.8e12) < 265


def test_device_memory_inputs() -> None:
    assert device_memory_bytes(12345) == 12345
    assert device_memory_bytes("H100") == DEVICE_MEMORY[H100]
    assert 79 * GiB < DEVICE_MEMORY[H100] < 80 * GiB
    assert device_memory_bytes("cpu") > 0
    with pytest.raises(ValueError, match="unknown device 'tpu-v9'"):
        device_memory_bytes("tpu-v9")
    with pytest.raises(ValueError, match="unknown weight format 'fp8'"):
        plan(WIZARD, H100, "fp8")
