"""Helpers for the multi-rank tests: small checkpoints written without transformers, a greedy
trace of the model's forward, and the function each spawned rank runs.

    config = small_config(vocab_size=256)
    model = save_checkpoint(random_model(config, seed=0), folder, layout="classic"|"fused",
                            shards=1|2)
    trace = greedy_trace(model, cache, PROMPTS, steps=4)     # tokens and every step's logits
    run_ranks(world_size, folder, out_dir)                   # spawns the ranks (rank_main)

Spawned ranks import this module (tests is a package, and "spawn" children get the parent's
sys.path), so it imports nothing from pytest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from local_backend.config import ModelConfig
from local_backend.kv_cache import KVCache
from local_backend.model import Transformer

PROMPTS = [[1, 17, 42, 99, 5], [1, 250, 3]]  # ragged: one prefill pads the second row
MAX_SEQ_LEN = 32


def small_config(**overrides: Any) -> ModelConfig:
    """8 query heads, 4 kv heads, 8 experts: splits evenly over 1, 2 and 4 ranks."""
    sizes: dict[str, Any] = {
        "dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "intermediate": 96,
        "n_experts": 8, "top_k": 2, "vocab_size": 256, "max_seq_len": 128, "name": "parallel",
    }  # fmt: skip
    return ModelConfig(**{**sizes, **overrides})


def random_model(config: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer.from_config(config, dtype=torch.float32)
    for param in model.parameters():  # wider than the default init: logits far from ties
        param.mul_(2.0)
    return model


def _hf_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "mixtral", "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "intermediate_size": config.intermediate,
        "num_local_experts": config.n_experts, "num_experts_per_tok": config.top_k,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }  # fmt: skip


def hf_tensors(model: Transformer, layout: str = "classic") -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, in the classic or the fused layout."""
    tensors = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.output.weight,
    }
    attention = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    for n, layer in enumerate(model.layers):
        prefix = f"model.layers.{n}."
        tensors[prefix + "input_layernorm.weight"] = layer.attention_norm.weight
        tensors[prefix + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
        for ours, theirs in attention.items():
            weight = getattr(layer.attention, ours).weight
            tensors[prefix + f"self_attn.{theirs}.weight"] = weight
        moe = layer.block_sparse_moe
        if layout == "fused":
            tensors[prefix + "mlp.gate.weight"] = moe.gate.weight
            tensors[prefix + "mlp.experts.gate_up_proj"] = torch.cat([moe.w1, moe.w3], dim=1)
            tensors[prefix + "mlp.experts.down_proj"] = moe.w2
            continue
        tensors[prefix + "block_sparse_moe.gate.weight"] = moe.gate.weight
        for e in range(moe.n_experts):
            for which in ("w1", "w2", "w3"):
                name = f"block_sparse_moe.experts.{e}.{which}.weight"
                tensors[prefix + name] = getattr(moe, which)[e]
    return {name: t.detach().contiguous().clone() for name, t in tensors.items()}


def save_checkpoint(
    model: Transformer, folder: Path, layout: str = "classic", shards: int = 1
) -> Transformer:
    """Write `model` as a Hugging Face folder (config.json + safetensors, `shards` files with
    an index when more than one); returns the model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_hf_config(model.config)))
    tensors = hf_tensors(model, layout)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return model
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({name: tensors[name] for name in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


@torch.inference_mode()
def greedy_trace(model: Any, cache: KVCache, prompts: list[list[int]], steps: int) -> dict:
    """Greedy decoding of `prompts` side by side: one ragged prefill (every position's
    logits), a last_token_only prefill of one more token, then `steps` batched decode steps.
    Returns {"tokens": [B, steps + 1] ids, "logits": [each forward's logits]}."""
    B, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, width, dtype=torch.long)
    positions = torch.full((B, width), -1, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        tokens[b, : len(prompt)] = torch.tensor(prompt)
        positions[b, : len(prompt)] = torch.arange(len(prompt))
    slots = torch.arange(B)
    logits = model(tokens, positions, cache, slots)  # [B, T, V]
    trace = [logits]
    lengths = torch.tensor([len(p) for p in prompts])
    last = logits[torch.arange(B), lengths - 1]  # [B, V]
    generated = [last.argmax(-1)]
    # one more token through the last_token_only path (what the scheduler's prefill uses)
    step = model(generated[-1][:, None], lengths[:, None], cache, slots, last_token_only=True)
    trace.append(step)
    generated.append(step[:, -1].argmax(-1))
    for i in range(1, steps):
        step = model(generated[-1][:, None], (lengths + i)[:, None], cache, slots)
        trace.append(step)
        generated.append(step[:, -1].argmax(-1))
    return {"tokens": torch.stack(generated, dim=1), "logits": trace}


def rank_main(
    rank: int, world_size: int, folder: str, broken: str, out_dir: str, init: str
) -> None:
    """One spawned rank: join a world of `world_size`, then for each sub-world of 2 and 4
    ranks (every rank creates the groups; ranks outside one skip it) load the shard, and run
    greedy_trace on rank 0 through a StepLeader while the others follow. Rank 0 saves each
    world's trace to out_dir/world{W}.pt. Then ranks 0-1 load `broken` (a checkpoint only
    rank 1's shard notices is broken) and `folder` again with rank 0 failing: each rank saves
    what the load agreement told it to out_dir/failures{rank}.pt; and they trace `folder`
    with int8 experts (out_dir/world2-int8-experts.pt)."""
    from local_backend.parallel import context_over, init_parallel, shutdown_parallel
    from local_backend.parallel_serve import load_rank_model
    from local_backend.parallel_worker import StepLeader, follow_steps

    torch.set_num_threads(1)
    init_parallel("cpu", rank, world_size, init)
    contexts = [(w, context_over(range(w))) for w in (2, 4) if w <= world_size]
    for w, parallel in contexts:
        if parallel is None:
            continue
        model = load_rank_model(folder, parallel, torch.device("cpu"), torch.float32,
                                MAX_SEQ_LEN, len(PROMPTS))  # fmt: skip
        cache = KVCache(model.config, len(PROMPTS), MAX_SEQ_LEN, dtype=torch.float32,
                        kv_heads=model.cache_kv_heads)  # fmt: skip
        if not parallel.is_leader:
            follow_steps(model, cache, parallel)
            continue
        leader = StepLeader(model, keepalive_s=0.02)
        first = greedy_trace(leader, cache, PROMPTS, steps=4)
        time.sleep(0.15)  # idle: keep-alives go out between the two traces
        again = greedy_trace(leader, cache, PROMPTS, steps=4)
        leader.close()
        torch.save({"first": first, "again": again}, Path(out_dir) / f"world{w}.pt")
    pair = context_over(range(2))
    if pair is not None:
        torch.save(_load_failures(pair, folder, broken), Path(out_dir) / f"failures{rank}.pt")
        # int8 experts, quantized as each rank loads its own (the torch backend's loop)
        model = load_rank_model(folder, pair, torch.device("cpu"), torch.float32, MAX_SEQ_LEN,
                                len(PROMPTS), weight_format="int8-experts")  # fmt: skip
        cache = KVCache(model.config, len(PROMPTS), MAX_SEQ_LEN, dtype=torch.float32,
                        kv_heads=model.cache_kv_heads)  # fmt: skip
        if pair.is_leader:
            leader = StepLeader(model)
            trace = greedy_trace(leader, cache, PROMPTS, steps=4)
            leader.close()
            torch.save(trace, Path(out_dir) / "world2-int8-experts.pt")
        else:
            follow_steps(model, cache, pair)
    shutdown_parallel()


class _Loaded:
    """Stands in for rank 0's service in agree_loaded (the engine it stops on failure)."""

    def __init__(self) -> None:
        self.engine = self
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def _load_failures(parallel: Any, folder: str, broken: str) -> dict[str, Any]:
    from local_backend.parallel_serve import (
        RankOptions,
        agree_loaded,
        load_rank_model,
        run_follower,
    )

    def leader_load(model_dir: str, fail: bool) -> dict[str, Any]:
        loaded = _Loaded()

        def load() -> _Loaded:
            if fail:
                raise OSError("rank 0 cannot read its disk")
            load_rank_model(model_dir, parallel, torch.device("cpu"), torch.float32, 8, 1)
            return loaded

        try:
            agree_loaded(parallel, load)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "engine_stopped": loaded.stopped}
        return {"error": None}

    if parallel.is_leader:
        return {"broken": leader_load(broken, False), "leader_fails": leader_load(folder, True)}
    results = {}
    for name, model_dir in (("broken", broken), ("leader_fails", folder)):
        options = RankOptions(Path(model_dir), "cpu", torch.float32, max_slots=1, max_seq_len=8)
        results[name] = run_follower(options, parallel)
    return results
