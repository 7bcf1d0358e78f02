"""Launch configs as data: lookup by device and nearest bucket, decode attention reading its
tuned config (and splitting each sequence's actual length), and the tuner's --tiny run writing
files the kernels then read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from local_backend.kernels import decode_attention as attn
from local_backend.kernels import dense_quant as dq
from local_backend.kernels import launch_configs, reference
from local_backend.kernels.quant import quantize_int8
from local_backend.kernels.runtime import tile_counters

from .helpers import FP32, assert_near, requires_triton

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_dir(tmp_path: Path):
    launch_configs.use_directory(tmp_path)
    yield tmp_path
    launch_configs.use_directory(None)


def test_lookup_nearest_bucket_in_log_space(config_dir: Path) -> None:
    configs = {"s": {"1x1024": {"a": 1}, "8x1024": {"a": 2}, "1x65536": {"a": 3}, "bad": {}}}
    launch_configs.write_configs("k", "cpu", "cpu", configs, config_dir)
    cpu = torch.device("cpu")
    assert launch_configs.lookup("k", cpu, "s", (1, 2048)) == {"a": 1}
    assert launch_configs.lookup("k", cpu, "s", (6, 900)) == {"a": 2}
    assert launch_configs.lookup("k", cpu, "s", (1, 40000)) == {"a": 3}
    assert launch_configs.lookup("k", cpu, "other shape", (1, 1)) is None
    assert launch_configs.lookup("never tuned", cpu, "s", (1, 1)) is None
    # a later write merges: buckets not rewritten survive
    launch_configs.write_configs("k", "cpu", "cpu", {"s": {"1x1024": {"a": 9}}}, config_dir)
    assert launch_configs.lookup("k", cpu, "s", (1, 1024)) == {"a": 9}
    assert launch_configs.lookup("k", cpu, "s", (8, 1024)) == {"a": 2}


def test_broken_config_file_falls_back(config_dir: Path) -> None:
    path = launch_configs.config_path("k", "cpu", config_dir)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    launch_configs.use_directory(config_dir)  # reload
    assert launch_configs.lookup("k", torch.device("cpu"), "s", (1,)) is None


def test_attention_reads_its_tuned_config(config_dir: Path) -> None:
    cpu = torch.device("cpu")
    key = attn.shape_key(48, 8, 128)
    tuned = attn.AttentionConfig(num_splits=24, block_n=128, num_warps=8, num_stages=2)
    launch_configs.write_configs(
        attn.KERNEL, "cpu", "cpu", {key: {"1x4096": tuned.as_dict()}}, config_dir
    )
    assert attn.choose_config(1, 48, 8, 128, 4096, cpu) == tuned
    assert attn.choose_config(1, 32, 8, 128, 4096, cpu) == attn.heuristic_config(1, 8, 4096, cpu)


@requires_triton
@pytest.mark.parametrize("block_n", [16, 32])
def test_attention_splits_the_actual_length(block_n: int) -> None:
    """More splits than a short sequence has key blocks: its length is shared among the
    first splits, the rest return neutral partials; long and empty rows in the same batch."""
    k_cache = torch.randn(3, 200, 2, 32)
    v_cache = torch.randn(3, 200, 2, 32)
    q = torch.randn(4, 6, 32)
    slots, lengths = torch.tensor([0, 1, 2, 1]), torch.tensor([5, 200, 0, 33])
    config = attn.AttentionConfig(num_splits=7, block_n=block_n)
    out = attn.decode_attention(q, k_cache, v_cache, slots, lengths, config=config)
    assert_near(out, reference.decode_attention(q, k_cache, v_cache, slots, lengths), FP32)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # length 0: every split empty
    # the last split of each (sequence, KV head) merged and reset its counter (graph replays)
    assert not tile_counters(torch.device("cpu")).any()


@requires_triton
def test_tuner_tiny_writes_configs_the_kernels_read(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    subprocess.run(
        [sys.executable, "bench/tune_kernels.py", "--tiny", "--formats", "int8",
         "--out", str(tmp_path), "--summary", str(summary)],
        cwd=ROOT, check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    report = json.loads(summary.read_text())
    assert report["device_key"] == "cpu"
    dense_rows = report["kernels"][dq.KERNEL]["summary"]
    assert {row["m"] for row in dense_rows} == {1, 32, 64}
    assert all(row["best_ms"] > 0 for row in dense_rows)
    attention_rows = report["kernels"][attn.KERNEL]["summary"]
    assert {(row["batch"], row["length"]) for row in attention_rows} == {(1, 128), (2, 256)}
    launch_configs.use_directory(tmp_path)
    try:
        cpu = torch.device("cpu")
        weight = dq.DenseQuantWeight.from_quantized(quantize_int8(torch.randn(48, 64)))
        for row in dense_rows:
            assert dq.choose_config(weight, row["m"], cpu).as_dict() == row["config"]
        for row in attention_rows:
            chosen = attn.choose_config(row["batch"], 6, 2, 32, row["length"], cpu)
            assert chosen.as_dict() == row["config"]
    finally:
        launch_configs.use_directory(None)


@pytest.mark.gpu
@requires_triton
@pytest.mark.parametrize(("batch", "length"), [(1, 1024), (1, 65536), (8, 4096), (32, 1024)])
def test_attention_gqa_48_8_gpu(batch: int, length: int) -> None:
    """GQA 48/8, head dim 128, bf16, with the device's tuned (or heuristic) config; ragged
    lengths inside a cache of `length` positions."""
    device = torch.device("cuda")
    k_cache = torch.randn(batch, length, 8, 128, device=device).bfloat16()
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, 48, 128, device=device).bfloat16()
    slots = torch.arange(batch, device=device)
    lengths = torch.randint(1, length + 1, (batch,), device=device)
    lengths[0] = length
    out = attn.decode_attention(q, k_cache, v_cache, slots, lengths).float()
    expected = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), slots,
                                          lengths)  # fmt: skip
    assert float((out - expected).abs().max()) < 2e-2
