"""DecodeRunner: the engine's decode step through kernels.decode_step (bucketed, padded, CUDA
graphs on CUDA) when the model has the triton backend, model.forward otherwise.

Off CUDA the triton kernels run in triton's interpreter (local_backend.kernels switches it on
when imported before triton, as here), so the bucketing and padding run exactly as on a GPU,
only the graph capture itself is skipped; the `gpu` test checks the replays against eager.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from local_backend.decode_runner import DecodeRunner, default_buckets
from local_backend.engine import Engine
from local_backend.kernels import decode_step, install
from local_backend.kernels.runtime import HAS_TRITON, interpreting
from local_backend.kv_cache import KVCache
from local_backend.loader import load_model
from local_backend.model import Transformer

from .engine_fixtures import MAX_SEQ_LEN, PROMPTS, greedy, tokenizer_fixture  # noqa: F401

requires_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and interpreting()),
    reason="needs triton's CPU interpreter (no CUDA, triton imported after local_backend.kernels)",
)
# fp32 end to end: kernels and torch differ only in summation order (observed ~1e-6)
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def triton_model(tiny_hf_model_dir: Path) -> Transformer:
    """The tiny checkpoint loaded with the triton backend forced (the CLI's --kernels triton)."""
    return load_model(
        tiny_hf_model_dir, "cpu", torch.float32, MAX_SEQ_LEN, 4, kernel_backend="triton"
    )


def random_cache(config: Any, max_slots: int, max_seq_len: int, seed: int) -> KVCache:
    """A cache whose every entry holds a distinct random value, so any stray write shows."""
    cache = KVCache(config, max_slots, max_seq_len, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=generator))
    cache.v.copy_(torch.randn(cache.v.shape, generator=generator))
    return cache


def clone_cache(cache: KVCache) -> KVCache:
    copy = KVCache(cache.config, cache.max_slots, cache.max_seq_len, dtype=cache.k.dtype)
    copy.k.copy_(cache.k)
    copy.v.copy_(cache.v)
    return copy


def test_buckets_are_powers_of_two_up_to_max_slots(tiny_model: tuple[Any, Any]) -> None:
    model, _ = tiny_model
    assert default_buckets(1) == (1,)
    assert default_buckets(8) == (1, 2, 4, 8)
    assert default_buckets(6) == (1, 2, 4, 6)
    runner = DecodeRunner(model, KVCache(model.config, 6, 16, dtype=torch.float32), max_slots=6)
    assert [runner.bucket_for(rows) for rows in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="exceed the largest decode bucket"):
        runner.bucket_for(7)
    with pytest.raises(ValueError, match="must be positive and reach max_slots"):
        DecodeRunner(model, runner.cache, max_slots=6, buckets=(1, 2, 4))


def test_torch_backend_runs_the_models_forward_unpadded(tiny_model: tuple[Any, Any]) -> None:
    model, config = tiny_model
    runner = DecodeRunner(model, random_cache(config, 4, 16, seed=3), max_slots=4)
    reference = clone_cache(runner.cache)
    assert not runner.uses_kernels
    logits = runner([7, 300, 42], [4, 9, 0], [1, 3, 0])
    expected = model(
        torch.tensor([[7], [300], [42]]), torch.tensor([[4], [9], [0]]), reference,
        torch.tensor([1, 3, 0]),
    )  # fmt: skip
    assert torch.equal(logits, expected[:, -1])
    assert torch.equal(runner.cache.k, reference.k)
    assert not runner.steps_per_bucket  # no bucket, no padding


def test_sliding_window_model_keeps_the_models_forward() -> None:
    """decode_step cannot capture windowed attention: the runner must not take the kernel path."""
    from local_backend.config import ModelConfig

    config = dataclasses.replace(ModelConfig.from_name("tiny"), vocab_size=256, sliding_window=16)
    model = install(Transformer.from_config(config), "triton")
    runner = DecodeRunner(model, KVCache(config, 2, 16, dtype=torch.float32), max_slots=2)
    assert model.kernel_backend == "triton" and not runner.uses_kernels  # type: ignore[attr-defined]


@requires_interpreter
def test_bad_rows_are_rejected_before_the_step(triton_model: Transformer) -> None:
    config = triton_model.config
    runner = DecodeRunner(triton_model, random_cache(config, 4, 16, seed=4), max_slots=4)
    before = runner.cache.k.clone()
    cases = [
        (([config.vocab_size], [0], [0]), "token ids must lie in"),
        (([1], [16], [0]), "positions must lie in"),
        (([1], [-1], [0]), "positions must lie in"),
        (([1], [0], [4]), "slots must lie in"),
        (([1, 2], [0, 0], [1, 1]), "share a cache slot"),
        (([1, 2], [0], [1, 2]), "one token, position and slot per row"),
        (([1] * 5, [0] * 5, [0, 1, 2, 3, 3]), "share a cache slot"),
    ]
    for (tokens, positions, slots), message in cases:
        with pytest.raises(ValueError, match=message):
            runner(tokens, positions, slots)
    assert torch.equal(runner.cache.k, before)
    assert not runner.steps_per_bucket


@requires_interpreter
def test_padding_rows_never_touch_the_cache(
    triton_model: Transformer, tiny_model: tuple[Any, Any]
) -> None:
    """3 rows run as bucket 4; the padding row names slot 0, which is live (a real row writes
    it) and slot 1 is free: after the step every cache entry but the 3 written ones is
    bit-identical, and the logits and written entries are the torch model's on an unpadded
    batch."""
    torch_model, config = tiny_model
    runner = DecodeRunner(triton_model, random_cache(config, 4, 32, seed=5), max_slots=4)
    reference = clone_cache(runner.cache)
    before_k, before_v = runner.cache.k.clone(), runner.cache.v.clone()
    tokens, positions, slots = [11, 500, 31999], [5, 3, 17], [3, 0, 2]

    logits = runner(tokens, positions, slots)

    assert runner.uses_kernels
    assert runner.steps_per_bucket == Counter({4: 1})
    expected = torch_model(
        torch.tensor(tokens)[:, None],
        torch.tensor(positions)[:, None],
        reference,
        torch.tensor(slots),
    )  # [3, 1, V]
    assert logits.shape == (3, config.vocab_size)
    assert_close(logits, expected[:, -1], atol=FP32_TOL, rtol=FP32_TOL)
    written = torch.zeros(4, 32, dtype=torch.bool)  # [slots, positions]
    written[slots, positions] = True
    for actual, before, ref in ((runner.cache.k, before_k, reference.k),
                                (runner.cache.v, before_v, reference.v)):  # fmt: skip
        assert torch.equal(actual[:, ~written], before[:, ~written])  # nothing else moved
        assert not torch.equal(actual[:, written], before[:, written])  # the step did write
        assert_close(actual[:, written], ref[:, written], atol=FP32_TOL, rtol=FP32_TOL)


@requires_interpreter
async def test_triton_engine_greedy_equals_torch_engine(
    triton_model: Transformer, tiny_model: tuple[Any, Any], tokenizer: Any
) -> None:
    """A ragged batch of 3 (prompts of 4, 13, 31 tokens; 5, 3, 2 new tokens) decodes at
    batches 3, 2, 1, 1: buckets 4 (one padding row), 2, 1, 1 through decode_step."""
    torch_model, config = tiny_model
    requests = [greedy(prompt, n) for prompt, n in zip(PROMPTS, (5, 3, 2), strict=True)]
    tokens: dict[str, list[list[int]]] = {}
    runners: dict[str, DecodeRunner] = {}
    for name, model in (("torch", torch_model), ("triton", triton_model)):
        engine = Engine(model, tokenizer, config, max_slots=4, max_seq_len=MAX_SEQ_LEN)
        try:
            tasks = [asyncio.create_task(engine.generate(r)) for r in requests]
            await asyncio.sleep(0)  # all three submit before the engine runs: one batch
            engine.start()
            results = await asyncio.gather(*tasks)
        finally:
            engine.stop()
        tokens[name] = [r.choices[0].token_ids for r in results]
        runners[name] = engine._scheduler.decode_runner

    assert [len(t) for t in tokens["torch"]] == [5, 3, 2]
    assert tokens["triton"] == tokens["torch"]
    assert runners["triton"].uses_kernels and not runners["torch"].uses_kernels
    assert runners["triton"].steps_per_bucket == Counter({4: 1, 2: 1, 1: 2})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_equal_uncaptured_decode_step_gpu(tiny_hf_model_dir: Path) -> None:
    """On CUDA the loader picks triton by itself; capture writes nothing; replays of buckets 4
    (3 rows + padding) and 1 give eager decode_step's logits and cache entries."""
    device = torch.device("cuda")
    model = load_model(tiny_hf_model_dir, device, torch.bfloat16, 64, 4, weight_format="bf16")
    assert model.kernel_backend == "triton"  # type: ignore[attr-defined]
    config = model.config
    cache = KVCache(config, 4, 64, device=device, dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(6)
    cache.k.copy_(torch.randn(cache.k.shape, generator=generator, device=device))
    cache.v.copy_(torch.randn(cache.v.shape, generator=generator, device=device))
    eager_cache = KVCache(config, 4, 64, device=device, dtype=torch.bfloat16)
    eager_cache.k.copy_(cache.k)
    eager_cache.v.copy_(cache.v)

    initial_k, initial_v = cache.k.clone(), cache.v.clone()

    runner = DecodeRunner(model, cache, max_slots=4)
    runner.warm_up()
    assert runner.captured_buckets == {1, 2, 4}
    assert torch.equal(cache.k, initial_k) and torch.equal(
        cache.v, initial_v
    )  # capture wrote nothing

    steps = [  # (tokens, positions, slots): slot 0 is live and is also the padding rows' slot
        ([11, 500, 31999], [5, 3, 17], [3, 0, 2]),
        ([42], [6], [3]),
        ([7, 8, 9], [7, 4, 18], [3, 0, 2]),
    ]
    written = torch.zeros(4, 64, dtype=torch.bool, device=device)  # [slots, positions]
    for tokens, positions, slots in steps:
        replayed = runner(tokens, positions, slots).clone()
        with torch.inference_mode():
            eager = decode_step(
                model, torch.tensor(tokens, device=device)[:, None],
                torch.tensor(positions, device=device)[:, None], eager_cache,
                torch.tensor(slots, device=device),
            )  # fmt: skip
        # the same kernels; only split-K's atomic fp32 sums may land in another order
        assert_close(replayed, eager[:, -1], atol=2e-2, rtol=2e-2)
        written[slots, positions] = True
    assert runner.steps_per_bucket == Counter({4: 2, 1: 1})
    for actual, initial, eager_side in ((cache.k, initial_k, eager_cache.k),
                                        (cache.v, initial_v, eager_cache.v)):  # fmt: skip
        assert torch.equal(actual[:, ~written], initial[:, ~written])
        assert not torch.equal(actual[:, written], initial[:, written])
        assert_close(actual[:, written], eager_side[:, written], atol=2e-2, rtol=2e-2)
