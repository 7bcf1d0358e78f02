"""`install(model, backend)`: the triton model gives the torch model's logits (tiny model,
through the interpreter), quantized or not; "torch" undoes it; the backend choice; and the
CUDA-graph hook (a pass-through off CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from local_backend.kernels import capture_decode, decode_step, install, select_backend
from local_backend.kernels.runtime import HAS_TRITON, TritonUnavailable, interpreting
from local_backend.kv_cache import KVCache
from local_backend.model import Transformer
from local_backend.quantize import quantize_model

from .helpers import Tolerance, assert_near, requires_triton, tiny_model

# fp32 end to end; the kernels differ from torch only in summation order, which the 2-layer
# model amplifies a little: the model-parity suite's 1e-4 holds (observed ~1e-6).
LOGITS = Tolerance(atol=1e-4, rtol=1e-4)


def run_steps(model: Transformer, decode_steps: int = 2) -> list[torch.Tensor]:
    """Ragged prefill (row 1 right-padded with position -1), then decode steps; returns the
    logits of real tokens only (padding logits are meaningless by contract)."""
    cache = KVCache(model.config, 3, 32, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 6), generator=generator)
    positions = torch.arange(6).repeat(2, 1)
    positions[1, 4:] = -1
    slots = torch.tensor([2, 0])
    logits = model(tokens, positions, cache, slots)
    outputs = [logits[0], logits[1, :4]]
    step_positions = torch.tensor([[6], [4]])
    for _ in range(decode_steps):
        step_tokens = torch.randint(0, 256, (2, 1), generator=generator)
        outputs.append(model(step_tokens, step_positions, cache, slots))
        step_positions = step_positions + 1
    return outputs


def assert_same_logits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert_near(a, e, LOGITS)


@requires_triton
def test_triton_model_matches_torch_model() -> None:
    model = tiny_model()
    expected = run_steps(model)
    install(model, "triton")
    assert "forward" in model.layers[0].block_sparse_moe.__dict__
    assert_same_logits(run_steps(model), expected)
    install(model, "torch")  # and back: the model's own forwards again
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert_same_logits(run_steps(model), expected)


@requires_triton
def test_quantized_triton_model_matches_quantized_torch_model() -> None:
    """int4 experts and attention: fused MoE and dequant-GEMM projections in the model."""
    model = tiny_model()
    quantize_model(model, "int4", backend="torch")
    expected = run_steps(model, decode_steps=1)
    install(model, "triton")
    assert_same_logits(run_steps(model, decode_steps=1), expected)


def test_torch_backend_runs_quantized_experts() -> None:
    """The model's own MoE forward cannot read quantized buffers: "torch" installs the
    dequantizing reference instead, close to the unquantized model (int8: ~0.5% weights)."""
    model = tiny_model()
    expected = run_steps(model, decode_steps=1)
    quantize_model(model, "int8", backend="torch")
    actual = run_steps(model, decode_steps=1)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, atol=0.05 * float(e.abs().max()), rtol=0)


def test_select_backend() -> None:
    assert select_backend("cpu") == "torch"
    # CUDA picks triton where it is installed, the torch backend where it is not
    assert select_backend(torch.device("cuda")) == ("triton" if HAS_TRITON else "torch")
    assert select_backend("cuda", override="torch") == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        select_backend("cpu", override="cuda")
    if interpreting():
        assert select_backend("cpu", override="triton") == "triton"
    else:
        with pytest.raises(TritonUnavailable):
            select_backend("cpu", override="triton")


def test_install_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        install(tiny_model(), "cuda")  # type: ignore[arg-type]


@requires_triton
def test_sliding_window_keeps_the_models_attention() -> None:
    model = tiny_model(sliding_window=16)
    install(model, "triton")
    assert "forward" not in model.layers[0].attention.__dict__  # no windowed flash-decoding
    assert "forward" in model.layers[0].block_sparse_moe.__dict__


@requires_triton
def test_decode_step_and_graph_hook_off_cuda() -> None:
    """decode_step (the capturable forward) = model.forward at T = 1; off CUDA the graph hook
    captures nothing and calls the step."""
    model = install(tiny_model(), "triton")
    caches = [KVCache(model.config, 2, 16, dtype=torch.float32) for _ in range(2)]
    tokens, positions, slots = (
        torch.tensor([[5], [7]]),
        torch.tensor([[0], [3]]),
        torch.tensor([1, 0]),
    )
    expected = model(tokens, positions, caches[0], slots)
    graph = capture_decode(
        lambda t, p, s: decode_step(model, t, p, caches[1], s), tokens, positions, slots
    )
    assert not graph.captured
    assert_near(graph(tokens, positions, slots), expected, LOGITS)
    assert torch.equal(caches[0].k, caches[1].k)


@pytest.mark.gpu
@requires_triton
def test_cuda_graph_replays_decode_gpu() -> None:
    """On CUDA: replaying the captured decode step gives eager logits for new inputs."""
    device = torch.device("cuda")
    model = install(tiny_model(dtype=torch.bfloat16).to(device), "triton")
    cache = KVCache(model.config, 2, 64, device=device, dtype=torch.bfloat16)
    static = (
        torch.zeros(2, 1, dtype=torch.long, device=device),
        torch.zeros(2, 1, dtype=torch.long, device=device),
        torch.tensor([0, 1], device=device),
    )
    graph = capture_decode(lambda t, p, s: decode_step(model, t, p, cache, s), *static)
    assert graph.captured
    tokens = torch.tensor([[11], [42]], device=device)
    positions = torch.tensor([[0], [0]], device=device)
    replayed = graph(tokens, positions, static[2]).clone()
    eager = decode_step(model, tokens, positions, cache, static[2])
    assert_close(replayed, eager, atol=1e-2, rtol=1e-2)
