"""On a GPU: the whole Engine with the triton kernels (CUDA graphs, dense int8/int4 GEMV,
fused MoE, flash-decoding) produces the torch backend's greedy tokens on the same weights.

Equal tokens are required up to a near tie: where the two backends first part, the torch
backend's own top-2 logprobs must be within float noise of each other there (the kernels sum
in another order, and a tie can fall either way); everything before that point must match,
and a divergence at a clear gap (a real bug) fails. After a fork the texts differ legitimately,
so comparison stops at it. fp32 activations leave ~1e-5 of noise, bf16 ~1e-2.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from local_backend.config import ModelConfig
from local_backend.engine import Engine
from local_backend.generation import GenerationRequest, GenerationResult
from local_backend.kernels import install
from local_backend.model import Transformer
from local_backend.quantize import quantize_model
from local_backend.sampling import SamplingParams
from local_backend.tokenizer import Tokenizer

from .helpers import requires_triton

PROMPTS = [[1, 851, 349, 264, 1369], list(range(200, 237)), [1, *range(3000, 3012)]]
TIE = {torch.float32: 1e-3, torch.bfloat16: 0.1}  # logprob gap within the backends' noise


def generate(model: Transformer, tokenizer: Tokenizer, steps: int) -> list[GenerationResult]:
    params = SamplingParams(temperature=0.0, logprobs=2)
    engine = Engine(model, tokenizer, model.config, max_slots=4, max_seq_len=128).start()

    async def run_all() -> list[GenerationResult]:
        requests = [GenerationRequest(p, steps, params, ignore_eos=True) for p in PROMPTS]
        return list(await asyncio.gather(*(engine.generate(r) for r in requests)))

    try:
        with torch.inference_mode():
            return asyncio.run(run_all())
    finally:
        engine.stop()


@pytest.mark.gpu
@requires_triton
# fp32 activations hold the kernels to a tight tie tolerance, bf16 is what production runs
@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [("bf16", torch.float32), ("int8", torch.bfloat16), ("int4", torch.float32),
     ("int4", torch.bfloat16)],
)  # fmt: skip
def test_engine_greedy_tokens_triton_equal_torch_gpu(fmt: str, dtype: torch.dtype) -> None:
    config = dataclasses.replace(ModelConfig.from_name("small"), n_layers=3)
    torch.manual_seed(0)
    model = Transformer.from_config(config, device="cuda", dtype=dtype)
    # random logits are nearly flat (std ~0.6: near ties everywhere); sharpen them so a tie
    # is the exception the tolerance is for
    model.output.weight.data.mul_(8)
    quantize_model(model, fmt, backend="torch", quantize_head=fmt != "bf16")
    tokenizer = Tokenizer.from_mistral_common("v1")
    expected = generate(model, tokenizer, steps=16)
    install(model, "triton")
    actual = generate(model, tokenizer, steps=16)
    compared = 0
    for want, got in zip(expected, actual, strict=True):
        want_ids, got_ids = want.choices[0].token_ids, got.choices[0].token_ids
        assert len(got_ids) == len(want_ids) == 16
        for step, (a, b) in enumerate(zip(want_ids, got_ids, strict=True)):
            if a != b:
                logprobs = want.choices[0].logprobs
                assert logprobs is not None
                top = logprobs[step].top
                gap = top[0][1] - top[1][1]
                assert gap < TIE[dtype], (
                    f"step {step}: triton chose {b}, torch {a} with a logprob lead of {gap:.4f}"
                )
                break
            compared += 1
    assert compared >= 24  # most of the 48 tokens were compared, not skipped by early forks
