"""Our reference model against transformers' MixtralForCausalLM, an independent implementation.

Random-weight checkpoints of the 8x22B architecture at small sizes are written by
`save_pretrained` (safetensors) and loaded with our weights.py. In float32 our logits must match
HF's within atol 1e-4, rtol 1e-4, at prefill and at every decode step, and greedy decoding must
give the same tokens as `hf_model.generate(do_sample=False)`, alone and in ragged batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from local_backend.config import ModelConfig
from local_backend.kv_cache import CacheFullError, KVCache
from local_backend.model import MoE, Transformer

ATOL = RTOL = 1e-4
PARITY_SIZES: dict[str, Any] = {"vocab_size": 512, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def sharded(hf_checkpoint) -> tuple[Any, Path, Transformer]:
    """Classic per-expert names, sharded with an index (3 layers so shards split layers)."""
    hf_model, folder = hf_checkpoint(
        "parity_sharded", seed=1, shard="100KB", num_hidden_layers=3, **PARITY_SIZES
    )
    model = Transformer.from_model_dir(folder, dtype=torch.float32, progress=False)
    return hf_model, folder, model


def hf_logits(hf_model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]  # [T, V]


def hf_greedy(hf_model: Any, ids: list[int], n_new: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=n_new,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert out.shape[1] == len(ids) + n_new  # generation did not stop early
    return out[0, len(ids) :].tolist()


def prefill_batch(
    prompts: list[list[int]], left_pad: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts padded to one length: padding is token 0 at position -1."""
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    positions = torch.full((len(prompts), T), -1, dtype=torch.long)
    for b, (prompt, left) in enumerate(zip(prompts, left_pad, strict=True)):
        cols = slice(T - len(prompt), T) if left else slice(0, len(prompt))
        tokens[b, cols] = torch.tensor(prompt)
        positions[b, cols] = torch.arange(len(prompt))
    return tokens, positions


def test_saved_checkpoint_is_the_architecture_we_claim(sharded) -> None:
    _, folder, model = sharded
    raw = json.loads((folder / "config.json").read_text())
    assert raw["num_experts_per_tok"] == 2 and raw["num_local_experts"] == 8
    theta = raw.get("rope_parameters", {}).get("rope_theta", raw.get("rope_theta"))
    assert theta == 1e6
    assert raw["num_key_value_heads"] < raw["num_attention_heads"]  # grouped-query attention
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the sharded path is exercised
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in index["weight_map"]
    assert (model.config.top_k, model.config.rope_theta, model.config.n_layers) == (2, 1e6, 3)


def test_prefill_and_every_decode_step_match_hf_logits(sharded) -> None:
    hf_model, _, model = sharded
    ids = [1, 17, 300, 42, 99, 5, 250]
    cache = KVCache(model.config, max_slots=2, max_seq_len=64, dtype=torch.float32)
    slot = torch.tensor([cache.allocate()])
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slot)
    torch.testing.assert_close(ours[0], hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)

    for _ in range(6):
        ids.append(int(ours[0, -1].argmax()))
        with torch.no_grad():
            ours = model(torch.tensor([[ids[-1]]]), torch.tensor([[len(ids) - 1]]), cache, slot)
        torch.testing.assert_close(ours[0, -1], hf_logits(hf_model, ids)[-1], atol=ATOL, rtol=RTOL)


def greedy(
    model: Transformer, prompts: list[list[int]], n_new: int, slots: list[int], left_pad: list[bool]
) -> list[list[int]]:
    """Batched greedy decoding through the contract: one ragged prefill, then T = 1 steps."""
    cache = KVCache(model.config, max_slots=4, max_seq_len=64, dtype=torch.float32)
    tokens, positions = prefill_batch(prompts, left_pad)
    slot_ids = torch.tensor(slots)
    lengths = torch.tensor([len(p) for p in prompts])
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        logits = model(tokens, positions, cache, slot_ids, last_token_only=True)
        for step in range(n_new):
            nxt = logits[:, -1].argmax(dim=-1)  # [B]
            for b, tok in enumerate(nxt.tolist()):
                out[b].append(tok)
            if step + 1 < n_new:
                logits = model(nxt[:, None], (lengths + step)[:, None], cache, slot_ids)
    return out


def test_greedy_generation_matches_hf_generate(sharded) -> None:
    hf_model, _, model = sharded
    prompt = [1, 400, 23, 7, 311]
    assert greedy(model, [prompt], 12, slots=[0], left_pad=[False]) == [
        hf_greedy(hf_model, prompt, 12)
    ]


def test_ragged_batch_matches_hf_run_per_sequence(sharded) -> None:
    hf_model, _, model = sharded
    prompts = [[1, 9, 33], [1, 250, 251, 252, 8, 77, 410, 3, 64], [1, 500, 12, 12, 6]]
    left_pad = [False, False, True]  # padding on either side is allowed
    slots = [3, 0, 2]  # any free slots, not 0..B-1

    cache = KVCache(model.config, max_slots=4, max_seq_len=64, dtype=torch.float32)
    tokens, positions = prefill_batch(prompts, left_pad)
    with torch.no_grad():
        logits = model(tokens, positions, cache, torch.tensor(slots))
    for b, prompt in enumerate(prompts):
        real = positions[b] >= 0
        torch.testing.assert_close(
            logits[b, real], hf_logits(hf_model, prompt), atol=ATOL, rtol=RTOL
        )
        # Padding was not written: the slot holds nothing past the prompt.
        assert cache.k[:, slots[b], len(prompt) :].abs().sum() == 0
        assert cache.k[:, slots[b], : len(prompt)].abs().sum() > 0
    assert cache.k[:, 1].abs().sum() == 0  # the unused slot is untouched

    ours = greedy(model, prompts, 8, slots, left_pad)
    assert ours == [hf_greedy(hf_model, p, 8) for p in prompts]


def test_last_token_only_selects_each_rows_last_real_token(sharded) -> None:
    _, _, model = sharded
    prompts = [[1, 2, 3, 4, 5], [1, 7]]
    tokens, positions = prefill_batch(prompts, left_pad=[False, False])
    with torch.no_grad():
        full = model(
            tokens,
            positions,
            KVCache(model.config, 2, 16, "cpu", torch.float32),
            torch.tensor([0, 1]),
        )
        last = model(
            tokens,
            positions,
            KVCache(model.config, 2, 16, "cpu", torch.float32),
            torch.tensor([0, 1]),
            last_token_only=True,
        )
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last[0, 0], full[0, 4])
    torch.testing.assert_close(last[1, 0], full[1, 1])


def test_fused_transformers5_layout_matches_hf(hf_checkpoint) -> None:
    hf_model, folder = hf_checkpoint("parity_fused", seed=2, fused=True, **PARITY_SIZES)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names  # really the fused layout
    model = Transformer.from_model_dir(folder, dtype=torch.float32, progress=False)
    ids = [1, 3, 99, 480, 2, 7, 7, 300]
    cache = KVCache(model.config, 1, 32, "cpu", torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, torch.tensor([0]))
    torch.testing.assert_close(ours[0], hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)


def test_sliding_window_matches_hf(hf_checkpoint) -> None:
    hf_model, folder = hf_checkpoint("parity_window", seed=3, sliding_window=4, **PARITY_SIZES)
    model = Transformer.from_model_dir(folder, dtype=torch.float32, progress=False)
    assert model.config.sliding_window == 4
    ids = list(range(1, 13))  # longer than the window
    cache = KVCache(model.config, 1, 32, "cpu", torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, torch.tensor([0]))
    torch.testing.assert_close(ours[0], hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)


def dense_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the renormalised top-k router probabilities
    (zero for unchosen experts): the MoE written without any routing bookkeeping."""
    probs = torch.softmax(x @ moe.gate.weight.T, dim=-1)  # [N, E]
    kth = probs.topk(moe.top_k, dim=-1).values[:, -1:]  # [N, 1]
    chosen = torch.where(probs >= kth, probs, torch.zeros_like(probs))  # [N, E]
    mix = chosen / chosen.sum(dim=-1, keepdim=True)  # [N, E]
    outs = torch.stack(
        [
            (torch.nn.functional.silu(x @ moe.w1[e].T) * (x @ moe.w3[e].T)) @ moe.w2[e].T
            for e in range(moe.n_experts)
        ],
        dim=1,
    )  # [N, E, D]
    return (mix[:, :, None] * outs).sum(dim=1)  # [N, D]


def test_moe_with_all_tokens_on_one_expert_pair_and_empty_experts() -> None:
    config = ModelConfig.from_name("tiny")
    torch.manual_seed(0)
    moe = MoE(config).requires_grad_(False)
    x = torch.rand(2, 5, config.dim) + 0.1  # positive inputs ...
    with torch.no_grad():
        moe.gate.weight.fill_(-1.0)
        moe.gate.weight[3] = 1.0  # ... so every token prefers expert 3, then expert 6
        moe.gate.weight[6] = 0.5
    _, experts = moe.route(x.view(-1, config.dim))
    assert set(experts.flatten().tolist()) == {3, 6}  # six experts receive no token at all
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out.view(-1, config.dim), dense_moe(moe, x.view(-1, config.dim)))


def test_moe_random_routing_matches_dense_reference() -> None:
    config = ModelConfig.from_name("tiny")
    torch.manual_seed(1)
    moe = MoE(config).requires_grad_(False)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    x = torch.randn(3, 7, config.dim)
    _, experts = moe.route(x.view(-1, config.dim))
    assert len(set(experts.flatten().tolist())) > 2  # the routing is really spread out
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out.view(-1, config.dim), dense_moe(moe, x.view(-1, config.dim)))


def test_bfloat16_model_and_cache_track_float32(tiny_hf_model_dir: Path, tiny_model) -> None:
    model32, config = tiny_model
    model16 = Transformer.from_model_dir(tiny_hf_model_dir, dtype=torch.bfloat16, progress=False)
    assert model16.get_parameter("layers.0.block_sparse_moe.w1").dtype == torch.bfloat16
    ids = torch.tensor([[1, 3148, 1317, 338, 263, 1243]])
    pos = torch.arange(6)[None]
    with torch.no_grad():
        ref = model32(ids, pos, KVCache(config, 1, 16, "cpu", torch.float32), torch.tensor([0]))
        low = model16(ids, pos, KVCache(config, 1, 16, "cpu", torch.bfloat16), torch.tensor([0]))
    assert low.dtype == torch.float32  # logits come back in float32 whatever the weights
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_forward_rejects_bad_inputs_clearly(tiny_model) -> None:
    model, config = tiny_model
    cache = KVCache(config, 1, 8, "cpu", torch.float32)
    slot = torch.tensor([0])
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        model(torch.tensor([[5]]), torch.tensor([[8]]), cache, slot)
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[config.vocab_size]]), torch.tensor([[0]]), cache, slot)
    with pytest.raises(ValueError, match="shape mismatch"):
        model(torch.tensor([[5, 6]]), torch.tensor([[0]]), cache, slot)


def test_kv_cache_slots() -> None:
    config = ModelConfig.from_name("tiny")
    cache = KVCache(config, max_slots=2, max_seq_len=16, dtype=torch.float32)
    assert cache.k.shape == (config.n_layers, 2, 16, config.n_kv_heads, config.head_dim)
    a, b = cache.allocate(), cache.allocate()
    assert {a, b} == {0, 1}
    with pytest.raises(CacheFullError, match="all 2 slots"):
        cache.allocate()
    cache.free(a)
    assert cache.allocate() == a
    cache.free(b)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(b)
    with pytest.raises(ValueError, match="out of range"):
        cache.free(5)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(config, 1, config.max_seq_len + 1)
