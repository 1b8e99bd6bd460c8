"""KV cache: per layer `[B, S_max, H_kv, D]` keys and values plus per-sequence lengths.

The layout is the one the selective attention kernel reads directly (no transpose). The cache is a pytree so
a jitted decode step can take it with `donate_argnums` and XLA updates it in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from polar_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S_max, H_kv, D]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32: number of positions written for each sequence

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, capacity: int, dtype) -> "KVCache":
        shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k, v, jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in self.k + self.v)
