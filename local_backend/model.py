"""The reference forward pass of Mixtral (WizardLM-2 8x22B, Mixtral 8x22B), gpt-fast style.

Everything the model computes is in this one file, written for clarity; speed comes from
`local_backend/kernels` (which replaces module forwards through `kernels.install`) and from
the engine (batching, torch.compile). Over several GPUs each rank builds its own shard of this
same model (a ParallelContext sizes Attention and MoE; parallel.py, docs/multi_gpu.md). The
contract, from docs/architecture.md:

    Transformer.forward(tokens [B, T], positions [B, T], cache: KVCache, slots [B])
        -> logits [B, T, vocab] (float32)

`positions[b, t]` is the absolute position of `tokens[b, t]` in the sequence held by cache slot
`slots[b]`. The step writes that token's key/value at that position and attends causally to
positions <= it in the same slot. Padding carries position -1: it is not written and its logits
are meaningless (ragged prompts are padded that way; padding may sit on either side). Prefill is
T = prompt length, decode is T = 1. Two rows of one batch must not share a slot, and padding
tokens must still be valid ids (use 0).

Weights keep Hugging Face's layout, so HF checkpoints load without permutation: rotary
embeddings use HF's rotate_half convention (the first and second halves of each head are the
pairs), and the experts' w1/w3/w2 are the HF per-expert matrices stacked on a leading dim.

Legend for shape comments:
    B batch rows          T tokens per row in this step    S key positions attended (max pos + 1)
    D model dim           H query heads                    K key/value heads
    Dh head dim           E experts                        I expert intermediate size
    N tokens (B * T)      k experts per token (top_k)      V vocabulary
    n_e tokens routed to expert e                          L layers, P cache positions
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from local_backend.config import ModelConfig
from local_backend.kv_cache import KVCache
from local_backend.parallel import SINGLE_PROCESS, ParallelContext
from local_backend.weights import TensorTransform, load_weights

if TYPE_CHECKING:
    from local_backend.load_progress import LoadProgress


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 loses the small mean of squares), scale in the input dtype.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, Dh] for each token's position (padding, -1, is treated as 0)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))  # [Dh/2]
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq  # [B, T, Dh/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, Dh]: HF pairs dim i with i + Dh/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, Dh] by cos/sin [B, T, Dh] (HF Mixtral's convention)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, Dh]: broadcast over heads
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, parallel: ParallelContext = SINGLE_PROCESS
    ) -> None:
        super().__init__()
        self.layer_id = layer_id  # which layer of the KV cache this attention reads and writes
        # Over several ranks, this rank's share of the heads (all of them in one process);
        # its wo output is then a partial sum, which the hook adds up over the ranks.
        self.n_heads = parallel.part(config.n_heads)
        self.n_kv_heads = parallel.part(config.n_kv_heads)
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(config.dim, q_dim, bias=False)
        self.wk = nn.Linear(config.dim, kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, config.dim, bias=False)
        parallel.sum_outputs_across_ranks(self)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        S = mask.shape[-1]
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, Dh]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, Dh]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        # Write this step's keys/values at their positions of their row's slot; padding is
        # skipped so it can never overwrite a real entry.
        real = positions >= 0  # [B, T]
        write_slot = slots[:, None].expand(B, T)[real]  # [N_real]
        write_pos = positions[real]  # [N_real]
        cache.k[self.layer_id, write_slot, write_pos] = k[real].to(cache.k.dtype)
        cache.v[self.layer_id, write_slot, write_pos] = v[real].to(cache.v.dtype)

        # Read back each row's first S positions (this step's entries included).
        keys = cache.k[self.layer_id, slots, :S].to(q.dtype)  # [B, S, K, Dh]
        values = cache.v[self.layer_id, slots, :S].to(q.dtype)  # [B, S, K, Dh]
        # Grouped-query attention: query head h uses key/value head h // (H / K), as in HF.
        group = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(group, dim=2)  # [B, S, H, Dh]
        values = values.repeat_interleave(group, dim=2)  # [B, S, H, Dh]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [B, H, T, Dh]
            keys.transpose(1, 2),  # [B, H, S, Dh]
            values.transpose(1, 2),  # [B, H, S, Dh]
            attn_mask=mask,  # [B, 1, T, S], True = may attend
        )  # [B, H, T, Dh]
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*Dh]
        return self.wo(out)


class MoE(nn.Module):
    """Sparse mixture of experts: each token goes to its top_k experts, mixed by router weight.

    expert_e(x) = w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x)). The router softmax runs in fp32
    over all experts; the top_k probabilities are renormalised to sum to 1 (HF Mixtral).

    Over several ranks (expert parallel) this module holds n_experts = E / ranks of them,
    global ids first_expert .. first_expert + n_experts - 1, numbered from 0 here. The router
    still scores all E; route() renumbers its choices to this rank's numbering, so experts of
    other ranks fall outside [0, n_experts) and add nothing here; the hook sums the ranks.
    """

    def __init__(self, config: ModelConfig, parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        E, I, D = parallel.part(config.n_experts), config.intermediate, config.dim
        self.n_experts = E  # the experts this module holds
        self.first_expert = parallel.first(config.n_experts)
        self.top_k = config.top_k
        self.gate = nn.Linear(D, config.n_experts, bias=False)  # the router, over all experts
        self.w1 = nn.Parameter(torch.empty(E, I, D))  # gate projections, stacked per expert
        self.w2 = nn.Parameter(torch.empty(E, D, I))  # down projections
        self.w3 = nn.Parameter(torch.empty(E, I, D))  # up projections
        self.reset_parameters()
        parallel.sum_outputs_across_ranks(self)

    def reset_parameters(self) -> None:
        # Like nn.Linear's default (uniform, bound 1/sqrt(fan_in)); real weights are loaded.
        for weight in (self.w1, self.w2, self.w3):
            bound = weight.shape[-1] ** -0.5
            nn.init.uniform_(weight, -bound, bound)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts of each token x [N, D]: weights [N, k] (fp32) and ids [N, k], in this
        module's numbering (see the class docstring)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [N, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [N, k], [N, k]
        if self.first_expert:  # a later rank's experts (no extra op in one process)
            experts = experts - self.first_expert
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # [N, D]
        weights, experts = self.route(x)  # [N, k], [N, k]
        out = torch.zeros_like(x)  # [N, D]
        for e in range(self.n_experts):
            # An expert with no tokens gets empty index tensors and adds nothing.
            token_idx, choice_idx = torch.where(experts == e)  # [n_e], [n_e]
            h = x[token_idx]  # [n_e, D]
            y = F.linear(F.silu(F.linear(h, self.w1[e])) * F.linear(h, self.w3[e]), self.w2[e])
            y = y * weights[token_idx, choice_idx, None]  # [n_e, D], mixed in fp32 like HF
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out.view(B, T, D)  # [B, T, D]


class TransformerBlock(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, parallel: ParallelContext = SINGLE_PROCESS
    ) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_id, parallel)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.block_sparse_moe = MoE(config, parallel)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, positions, cache, slots)
        return h + self.block_sparse_moe(self.ffn_norm(h))


class Transformer(nn.Module):
    """MixtralForCausalLM-equivalent. Build with from_config (random weights, or the meta
    device for shapes only) or from_model_dir (a Hugging Face safetensors folder).

    `parallel` (local_backend/parallel.py) makes this one rank's shard of a tensor- and
    expert-parallel model; the embeddings, norms and output head are whole on every rank.
    """

    def __init__(self, config: ModelConfig, parallel: ParallelContext = SINGLE_PROCESS) -> None:
        super().__init__()
        parallel.check(config)
        self.config = config
        self.parallel = parallel
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(config, i, parallel) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    @property
    def cache_kv_heads(self) -> int:
        """Key/value heads this model's KV cache holds (this rank's share)."""
        return self.parallel.part(self.config.n_kv_heads)

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        parallel: ParallelContext = SINGLE_PROCESS,
    ) -> Transformer:
        """Randomly initialised model (seed torch first for repeatability); on device "meta"
        nothing is allocated, which is how the loader and parameter counts use it."""
        with torch.device(device):
            model = cls(config, parallel)
        return model.to(dtype).eval().requires_grad_(False)

    @classmethod
    def from_model_dir(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        transform: TensorTransform | None = None,
        progress: bool | LoadProgress = True,
    ) -> Transformer:
        """Load a Hugging Face Mixtral folder (config.json + safetensors); see weights.py."""
        return load_model(path, device=device, dtype=dtype, transform=transform, progress=progress)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        last_token_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] in float32 (see the module docstring for the contract).

        last_token_only=True (an optional extension of the contract) returns [B, 1, V]: the
        logits of each row's highest-position token, so a long prefill need not materialise
        T x V logits.
        """
        B = tokens.shape[0]
        if positions.shape != tokens.shape or slots.shape != (B,):
            raise ValueError(
                f"shape mismatch: tokens {tuple(tokens.shape)}, positions "
                f"{tuple(positions.shape)}, slots {tuple(slots.shape)} (expected [B, T], "
                "[B, T], [B])"
            )
        # One host sync for the bounds: an out-of-range index is a device assert on CUDA.
        max_pos, min_tok, max_tok = torch.stack(
            [positions.max(), tokens.min(), tokens.max()]
        ).tolist()
        if not 0 <= max_pos < cache.max_seq_len:
            raise ValueError(
                f"positions must lie in [0, {cache.max_seq_len}) with at least one real "
                f"token per step, got max {max_pos}"
            )
        if min_tok < 0 or max_tok >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got [{min_tok}, {max_tok}]"
            )
        S = max_pos + 1  # key positions any row can attend to in this step

        x = self.tok_embeddings(tokens)  # [B, T, D]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = self.attention_mask(positions, S)  # [B, 1, T, S]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, positions, cache, slots)
        if last_token_only:
            x = x[torch.arange(B, device=x.device), positions.argmax(dim=1)][:, None]  # [B, 1, D]
        return self.output(self.norm(x)).float()

    def attention_mask(self, positions: torch.Tensor, S: int) -> torch.Tensor:
        """[B, 1, T, S] booleans: query (b, t) may see key position s of its own slot."""
        key_pos = torch.arange(S, device=positions.device)  # [S]
        query_pos = positions[:, :, None]  # [B, T, 1]
        allowed = key_pos <= query_pos  # [B, T, S]: causal
        window = self.config.sliding_window
        if window is not None:
            allowed &= key_pos > query_pos - window
        # Padding queries see position 0 only, so their softmax has a finite input; their
        # outputs are ignored.
        allowed |= (query_pos < 0) & (key_pos == 0)
        return allowed[:, None]  # [B, 1, T, S]: broadcast over heads


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    transform: TensorTransform | None = None,
    progress: bool | LoadProgress = True,
) -> Transformer:
    """ModelConfig.from_model_dir(path), a meta-device Transformer, then weights.load_weights."""
    config = ModelConfig.from_model_dir(path)
    model = Transformer.from_config(config, device="meta", dtype=dtype)
    load_weights(model, path, device=device, dtype=dtype, transform=transform, progress=progress)
    return model
