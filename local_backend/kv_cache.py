"""Static key/value cache with one slot per live sequence (contract in docs/architecture.md).

    cache = KVCache(config, max_slots=8, max_seq_len=4096, device="cuda", dtype=torch.bfloat16)
    slot = cache.allocate()       # lowest free slot; CacheFullError when all are in use
    ...                           # Transformer.forward(tokens, positions, cache, slots) fills it
    cache.free(slot)              # the slot may be reused; its stale entries are never read,
                                  # because a sequence only attends to positions it has written

Both tensors are allocated once, up front, so memory use is known before serving starts
(memory_plan.kv_cache_bytes gives the same number) and the shapes never change (CUDA graphs).

Legend: L = layers, S = slots, P = positions per slot (max_seq_len), H = KV heads, D = head_dim.
"""

from __future__ import annotations

import torch

from local_backend.config import ModelConfig


class CacheFullError(RuntimeError):
    """Every slot of the KV cache holds a live sequence."""


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        max_slots: int,
        max_seq_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        kv_heads: int | None = None,  # this rank's share over several ranks (parallel.py)
    ) -> None:
        if max_slots <= 0:
            raise ValueError(f"max_slots must be positive, got {max_slots}")
        if not 0 < max_seq_len <= config.max_seq_len:
            raise ValueError(
                f"max_seq_len must be in [1, {config.max_seq_len}] (the model's context), "
                f"got {max_seq_len}"
            )
        self.config = config
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        heads = config.n_kv_heads if kv_heads is None else kv_heads
        shape = (config.n_layers, max_slots, max_seq_len, heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, S, P, H, D]
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # [L, S, P, H, D]
        self._free = list(range(max_slots))  # kept sorted: allocate() hands out the lowest

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def allocate(self) -> int:
        """A free slot index; raises CacheFullError when every slot is in use."""
        if not self._free:
            raise CacheFullError(f"KV cache is full: all {self.max_slots} slots are in use")
        return self._free.pop(0)

    def free(self, slot: int) -> None:
        """Give `slot` back. Freeing a slot that is not allocated is a bug: ValueError."""
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is out of range [0, {self.max_slots})")
        if slot in self._free:
            raise ValueError(f"slot {slot} is not allocated (double free?)")
        self._free.append(slot)
        self._free.sort()
