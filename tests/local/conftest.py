"""Shared fixtures for local_backend tests: tiny Mixtral checkpoints written by transformers.

Fixtures (session-scoped, so transformers is imported and each folder written once):

    tiny_hf_model_dir   a folder saved by MixtralForCausalLM.save_pretrained (safetensors, seed
                        0, vocab 32000 so real v1 tokenizer ids are valid, no tokenizer files)
    tiny_model          (Transformer, ModelConfig) loaded from it with our loader, float32 on CPU
    hf_checkpoint       a factory: hf_checkpoint(name, seed=..., shard=..., fused=..., **sizes)
                        -> (hf_model, folder), cached by name, for parity tests

Helpers importable by tests: `tiny_hf_config(**overrides)`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from local_backend.config import ModelConfig
from local_backend.model import Transformer

TINY_HF_SIZES: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    # Wider than the default 0.02 so logits and router scores are far from ties.
    "initializer_range": 0.1,
}


def tiny_hf_config(**overrides: Any) -> Any:
    """A transformers MixtralConfig of the tiny sizes above (imports transformers)."""
    from transformers import MixtralConfig

    return MixtralConfig(**{**TINY_HF_SIZES, **overrides})


def build_hf_checkpoint(
    folder: Path, seed: int, shard: str | None = None, fused: bool = False, **overrides: Any
) -> Any:
    """Random-weight MixtralForCausalLM saved to `folder`; returns the model (eval, float32).

    shard: max_shard_size for save_pretrained (small -> sharded with an index.json).
    fused: save transformers 5's own layout (mlp.experts.gate_up_proj) instead of the classic
    per-expert names.
    """
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    hf_model = MixtralForCausalLM(tiny_hf_config(**overrides)).eval()
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if shard is not None:
        kwargs["max_shard_size"] = shard
    if fused:
        kwargs["save_original_format"] = False
    hf_model.save_pretrained(folder, **kwargs)
    return hf_model


@pytest.fixture(scope="session")
def tiny_hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_mixtral")
    build_hf_checkpoint(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_model_dir: Path) -> tuple[Transformer, ModelConfig]:
    model = Transformer.from_model_dir(tiny_hf_model_dir, dtype=torch.float32, progress=False)
    return model, model.config


@pytest.fixture(scope="session")
def hf_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[Any, Path]]:
    made: dict[str, tuple[Any, Path]] = {}

    def make(name: str, seed: int = 0, **kwargs: Any) -> tuple[Any, Path]:
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            made[name] = (build_hf_checkpoint(folder, seed=seed, **kwargs), folder)
        return made[name]

    return make
