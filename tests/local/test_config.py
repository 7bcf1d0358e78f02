"""ModelConfig: presets against the published model facts, both config.json forms, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from local_backend.config import ConfigError, ModelConfig
from local_backend.model import Transformer

# From the published config.json files (../shared/design.md, "Model facts").
FACTS_8X22B = {
    "dim": 6144,
    "intermediate": 16384,
    "n_layers": 56,
    "n_heads": 48,
    "n_kv_heads": 8,
    "head_dim": 128,
    "n_experts": 8,
    "top_k": 2,
    "rope_theta": 1e6,
    "norm_eps": 1e-5,
    "sliding_window": None,
    "tie_embeddings": False,
    "bos_id": 1,
    "eos_id": 2,
}

# WizardLM-2-8x22B's config.json as older transformers wrote it (rope_theta, torch_dtype).
OLD_FORM: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "max_position_embeddings": 65536,
    "model_type": "mixtral",
    "num_attention_heads": 48,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 56,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.2",
    "use_cache": False,
    "vocab_size": 32000,
}

# Mixtral-8x22B-Instruct as transformers 5 writes it (rope_parameters, dtype, head_dim null).
NEW_FORM: dict[str, Any] = {
    **{k: v for k, v in OLD_FORM.items() if k not in ("rope_theta", "torch_dtype")},
    "vocab_size": 32768,
    "head_dim": None,
    "dtype": "bfloat16",
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "transformers_version": "5.0.0",
}


def write_config(folder: Path, raw: dict[str, Any] | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = raw if isinstance(raw, str) else json.dumps(raw)
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("name", "vocab"), [("wizardlm-2-8x22b", 32000), ("mixtral-8x22b-instruct", 32768)]
)
def test_presets_match_published_facts(name: str, vocab: int) -> None:
    config = ModelConfig.from_name(name)
    for field, value in FACTS_8X22B.items():
        assert getattr(config, field) == value, field
    assert config.vocab_size == vocab
    assert config.max_seq_len == 65536


def test_8x22b_parameter_counts_from_config_and_from_the_meta_model() -> None:
    config = ModelConfig.from_name("wizardlm-2-8x22b")
    model = Transformer.from_config(config, device="meta")  # shapes only, no memory
    counted = sum(p.numel() for p in model.parameters())
    assert counted == config.num_parameters()
    assert round(counted / 1e9, 1) == 140.6
    # Active: everything but 6 of the 8 experts in each layer.
    expert = sum(
        model.get_parameter(f"layers.0.block_sparse_moe.{w}")[0].numel() for w in ("w1", "w2", "w3")
    )
    active = counted - config.n_layers * (config.n_experts - config.top_k) * expert
    assert config.active_parameters() == active
    assert round(active / 1e9) == 39


def test_small_presets_are_the_same_architecture() -> None:
    for name in ("tiny", "small", "mixtral-8x7b"):
        config = ModelConfig.from_name(name)
        assert (config.n_experts, config.top_k) == (8, 2)
        assert config.n_kv_heads < config.n_heads and config.head_dim * config.n_heads == config.dim
    assert ModelConfig.from_name("TINY").dim == 64  # case-insensitive
    with pytest.raises(ConfigError, match=r"unknown model preset 'gpt-5'.*wizardlm-2-8x22b"):
        ModelConfig.from_name("gpt-5")


def test_from_model_dir_old_form(tmp_path: Path) -> None:
    config = ModelConfig.from_model_dir(write_config(tmp_path / "wizardlm", OLD_FORM))
    preset = ModelConfig.from_name("wizardlm-2-8x22b")
    assert config.head_dim == 128  # absent -> hidden_size // heads
    assert config.dtype == "bfloat16"
    assert config.rope_theta == 1e6 and isinstance(config.rope_theta, float)
    assert {**vars(config), "name": ""} == {**vars(preset), "name": ""}


def test_from_model_dir_new_form(tmp_path: Path) -> None:
    config = ModelConfig.from_model_dir(write_config(tmp_path / "mixtral", NEW_FORM))
    preset = ModelConfig.from_name("mixtral-8x22b-instruct")
    assert config.head_dim == 128  # null -> hidden_size // heads
    assert {**vars(config), "name": ""} == {**vars(preset), "name": ""}


def test_new_form_theta_wins_and_explicit_head_dim_is_kept(tmp_path: Path) -> None:
    raw = {**NEW_FORM, "rope_parameters": {"rope_theta": 5e5}, "head_dim": 64}
    config = ModelConfig.from_model_dir(write_config(tmp_path, raw))
    assert (config.rope_theta, config.head_dim) == (5e5, 64)


def test_config_written_by_installed_transformers(tiny_hf_model_dir: Path) -> None:
    config = ModelConfig.from_model_dir(tiny_hf_model_dir)
    raw = json.loads((tiny_hf_model_dir / "config.json").read_text())
    assert (config.dim, config.n_layers, config.vocab_size) == (
        raw["hidden_size"],
        raw["num_hidden_layers"],
        raw["vocab_size"],
    )
    assert (config.top_k, config.n_experts, config.rope_theta) == (2, 8, 1e6)
    assert config.head_dim == raw["hidden_size"] // raw["num_attention_heads"]


def test_eos_list_takes_the_first(tmp_path: Path) -> None:
    config = ModelConfig.from_model_dir(
        write_config(tmp_path, {**OLD_FORM, "eos_token_id": [2, 32000]})
    )
    assert config.eos_id == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (
            {k: v for k, v in OLD_FORM.items() if k != "hidden_size"},
            "missing required field 'hidden_size'",
        ),
        ({**OLD_FORM, "num_hidden_layers": "56"}, "'num_hidden_layers' must be int"),
        ({**OLD_FORM, "model_type": "llama"}, "model_type is 'llama'"),
        (
            {**NEW_FORM, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
            "'yarn' is not supported",
        ),
        ({**OLD_FORM, "num_key_value_heads": 7}, "multiple of n_kv_heads"),
        ({**OLD_FORM, "num_experts_per_tok": 9}, "top_k .* exceeds n_experts"),
        ({**OLD_FORM, "rope_theta": "big"}, "rope_theta must be a number"),
    ],
)
def test_invalid_config_json_is_a_clear_error(tmp_path: Path, raw: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_model_dir(write_config(tmp_path, raw))


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json in"):
        ModelConfig.from_model_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"no config\.json in"):
        ModelConfig.from_model_dir(tmp_path / "absent")


def test_meta_model_allocates_nothing() -> None:
    model = Transformer.from_config(ModelConfig.from_name("mixtral-8x7b"), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.get_parameter("layers.0.block_sparse_moe.w1").shape == (8, 14336, 4096)
    assert model.get_parameter("layers.0.block_sparse_moe.w2").shape == (8, 4096, 14336)
    assert model.get_parameter("layers.0.attention.wk.weight").shape == (1024, 4096)
    assert model.output.weight.dtype == torch.float32
