"""Model configuration for the Mixtral architecture (WizardLM-2 8x22B, Mixtral 8x22B / 8x7B).

Public API:

    ModelConfig                    the dataclass every other module reads (sizes, rope, ids)
    ModelConfig.from_name(name)    a named preset from PRESETS
    ModelConfig.from_model_dir(p)  read a Hugging Face `config.json` (old or new form)
    ModelConfig.num_parameters()   total parameter count, computed from the sizes
    ModelConfig.active_parameters() parameters used per token (top_k of n_experts experts)
    ConfigError                    raised for a missing, unreadable or invalid configuration

`from_model_dir` accepts both forms Hugging Face has written for Mixtral:

- older: `"rope_theta": 1e6`, `"torch_dtype": "bfloat16"`, `"head_dim"` absent;
- newer (transformers >= 5): `"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}`,
  `"dtype": "bfloat16"`, `"head_dim": null` (meaning hidden_size // num_attention_heads).

The preset sizes come from the published config.json files of the models (see
../shared/design.md "Model facts"); tests/local/test_config.py checks them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration is missing, unreadable or describes something we do not run."""


@dataclass
class ModelConfig:
    dim: int = 6144  # hidden size
    n_layers: int = 56
    n_heads: int = 48  # query heads
    n_kv_heads: int = 8  # key/value heads (grouped-query attention)
    head_dim: int = 0  # 0 = dim // n_heads (what `"head_dim": null` means in config.json)
    intermediate: int = 16384  # each expert's hidden size
    n_experts: int = 8
    top_k: int = 2  # experts per token
    vocab_size: int = 32000
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 65536  # max_position_embeddings
    bos_id: int = 1
    eos_id: int = 2
    sliding_window: int | None = None  # None = full causal attention
    tie_embeddings: bool = False
    dtype: str = "bfloat16"  # the checkpoint's dtype, as config.json names it
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.n_heads > 0 and self.dim % self.n_heads != 0:
                raise ConfigError(
                    f"hidden size {self.dim} is not divisible by {self.n_heads} heads; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads if self.n_heads > 0 else 0
        positive = ["dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate"]
        positive += ["n_experts", "top_k", "vocab_size", "max_seq_len"]
        for field in positive:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A copy of the preset called `name` (case-insensitive); ConfigError if unknown."""
        key = name.strip().lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[key])

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelConfig:
        """Read `<path>/config.json` written by Hugging Face for a Mixtral model."""
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"no config.json in {Path(path)}")
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {config_path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{config_path}: expected a JSON object at the top level")
        return cls.from_hf_dict(raw, source=str(config_path), name=Path(path).name)

    @classmethod
    def from_hf_dict(
        cls, raw: dict[str, Any], source: str = "config.json", name: str = "custom"
    ) -> ModelConfig:
        """Map a Hugging Face MixtralConfig dict onto ModelConfig (see module docstring)."""
        model_type = raw.get("model_type")
        if model_type is not None and model_type != "mixtral":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'mixtral'")

        def get(key: str, kind: type, default: Any = ...) -> Any:
            if key not in raw or raw[key] is None:
                if default is ...:
                    raise ConfigError(f"{source}: missing required field {key!r}")
                return default
            value = raw[key]
            ok = isinstance(value, kind) and not isinstance(value, bool)
            if kind is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if kind is bool:
                ok = isinstance(value, bool)
            if not ok:
                raise ConfigError(f"{source}: field {key!r} must be {kind.__name__}, got {value!r}")
            return value

        rope = raw.get("rope_parameters")
        if rope is None:
            rope = raw.get("rope_scaling")  # transformers 4 wrote non-default rope here
            rope = dict(rope) if isinstance(rope, dict) else {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only default)")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 1e6))
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, int | float):
            raise ConfigError(f"{source}: rope_theta must be a number, got {rope_theta!r}")

        eos = raw.get("eos_token_id", 2)
        if isinstance(eos, list):  # several stop ids: the first is the end-of-sequence token
            eos = eos[0] if eos else 2
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        return cls(
            dim=get("hidden_size", int),
            n_layers=get("num_hidden_layers", int),
            n_heads=get("num_attention_heads", int),
            n_kv_heads=get("num_key_value_heads", int, raw.get("num_attention_heads")),
            head_dim=get("head_dim", int, 0),
            intermediate=get("intermediate_size", int),
            n_experts=get("num_local_experts", int),
            top_k=get("num_experts_per_tok", int),
            vocab_size=get("vocab_size", int),
            rope_theta=float(rope_theta),
            norm_eps=float(get("rms_norm_eps", float, 1e-5)),
            max_seq_len=get("max_position_embeddings", int, 32768),
            bos_id=get("bos_token_id", int, 1),
            eos_id=eos if isinstance(eos, int) else 2,
            sliding_window=get("sliding_window", int, None),
            tie_embeddings=get("tie_word_embeddings", bool, False),
            dtype=str(dtype),
            name=str(raw.get("_name_or_path") or name),
        )

    # -- sizes ------------------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def attention_parameters(self) -> int:
        """wq, wk, wv, wo of one layer."""
        return 2 * self.dim * self.q_dim + 2 * self.dim * self.kv_dim

    def expert_parameters(self) -> int:
        """w1, w2, w3 of one expert."""
        return 3 * self.dim * self.intermediate

    def embedding_parameters(self) -> int:
        """Token embeddings plus the output head (shared when tie_embeddings)."""
        return self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)

    def num_parameters(self) -> int:
        """Every parameter of the model (what a checkpoint stores)."""
        router_and_norms = self.dim * self.n_experts + 2 * self.dim
        per_layer = (
            self.attention_parameters()
            + self.n_experts * self.expert_parameters()
            + router_and_norms
        )
        return self.n_layers * per_layer + self.embedding_parameters() + self.dim

    def active_parameters(self) -> int:
        """Parameters one token touches: all but the (n_experts - top_k) unchosen experts."""
        unused = self.n_layers * (self.n_experts - self.top_k) * self.expert_parameters()
        return self.num_parameters() - unused


_8X22B = ModelConfig(
    dim=6144,
    n_layers=56,
    n_heads=48,
    n_kv_heads=8,
    head_dim=128,
    intermediate=16384,
    n_experts=8,
    top_k=2,
    vocab_size=32000,
    rope_theta=1e6,
    norm_eps=1e-5,
    max_seq_len=65536,
    name="wizardlm-2-8x22b",
)

PRESETS: dict[str, ModelConfig] = {
    "wizardlm-2-8x22b": _8X22B,
    "mixtral-8x22b-instruct": dataclasses.replace(
        _8X22B, vocab_size=32768, name="mixtral-8x22b-instruct"
    ),
    "mixtral-8x7b": ModelConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        intermediate=14336,
        vocab_size=32000,
        max_seq_len=32768,
        name="mixtral-8x7b",
    ),
    # Small sizes of the same architecture for tests and local smoke runs. The vocabulary is
    # the real v1 size so tokenizer ids are valid inputs.
    "tiny": ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate=128,
        vocab_size=32000,
        max_seq_len=4096,
        name="tiny",
    ),
    "small": ModelConfig(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        intermediate=512,
        vocab_size=32000,
        max_seq_len=8192,
        name="small",
    ),
}
