"""A tiny random Mixtral checkpoint in the Hugging Face layout, written with torch alone.

    folder = write_tiny_checkpoint(tmp_path / "tiny", seed=0)

config.json as transformers writes it for MixtralForCausalLM, and model.safetensors with the
classic per-expert names (model.layers.N.block_sparse_moe.experts.E.w1 ...). No transformers
import: the minimal-install CI venv (`make test-local-minimal`) serves it, and the main venv's
test checks transformers reads it and answers the same greedy tokens (test_hf_greedy.py).
Weights are drawn from torch's CPU generator with `seed`, so every venv with the pinned torch
writes the same bytes. Vocabulary 32000 so WizardLM-2's v1 tokenizer ids are valid; context
512, shorter than the gateway's default LOCAL_MAX_SEQ_LEN (the route must clamp to it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SIZES: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def hf_config(**overrides: Any) -> dict[str, Any]:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "sliding_window": None,
        "attention_dropout": 0.0,
        **SIZES,
        **overrides,
    }


def random_tensors(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors; scale 0.1 keeps logits and router scores far from ties."""
    gen = torch.Generator().manual_seed(seed)
    d, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.1

    def norm() -> torch.Tensor:
        return 1.0 + rand(d)

    tensors = {"model.embed_tokens.weight": rand(vocab, d)}
    for n in range(config["num_hidden_layers"]):
        layer = f"model.layers.{n}."
        tensors[layer + "input_layernorm.weight"] = norm()
        tensors[layer + "post_attention_layernorm.weight"] = norm()
        for name, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
            tensors[f"{layer}self_attn.{name}.weight"] = rand(rows, d)
        tensors[layer + "self_attn.o_proj.weight"] = rand(d, d)
        tensors[layer + "block_sparse_moe.gate.weight"] = rand(config["num_local_experts"], d)
        for e in range(config["num_local_experts"]):
            expert = f"{layer}block_sparse_moe.experts.{e}."
            tensors[expert + "w1.weight"] = rand(inter, d)
            tensors[expert + "w2.weight"] = rand(d, inter)
            tensors[expert + "w3.weight"] = rand(inter, d)
    tensors["model.norm.weight"] = norm()
    tensors["lm_head.weight"] = rand(vocab, d)
    return tensors


def write_tiny_checkpoint(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(**overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_tensors(config, seed), str(folder / "model.safetensors"), {"format": "pt"})
    return folder
