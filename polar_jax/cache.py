"""KV cache: per layer `[B, S_max, H_kv, D]` keys and values, per-row lengths and a live-row mask.

The layout is the one the selective attention kernel reads directly (no transpose). The cache owns its
writes: `LayerKV.write_prompt` (a prefill into chosen rows), `LayerKV.append` (one token per live row) and
`KVCache.insert` (prefilled rows into slots of a running batch) return new values and touch nothing
else, so a jitted step with the cache donated updates it in place and a row that is not written stays
bit-identical.

A row is *live* while it is decoding: a padded slot or a finished sequence is not, so it reads no KV,
writes nothing and does not count in the MLP union (see `polar_jax.selection`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.kv_append import kv_append, prefers_kv_append

from polar_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One layer's cache: k and v `[B, S, H_kv, D]`."""

    k: jax.Array
    v: jax.Array

    def write_prompt(self, k: jax.Array, v: jax.Array, rows: jax.Array | None = None) -> "LayerKV":
        """Keys/values of prompts `[b, T, H_kv, D]` at positions 0..T-1 of cache rows `rows` [b] (default:
        rows 0..b-1 in order, b = B). Positions >= T and the other rows are left as they are."""
        k, v = k.astype(self.k.dtype), v.astype(self.v.dtype)
        if rows is None and k.shape[0] == self.k.shape[0]:
            return LayerKV(jax.lax.dynamic_update_slice(self.k, k, (0, 0, 0, 0)),
                           jax.lax.dynamic_update_slice(self.v, v, (0, 0, 0, 0)))
        rows = jnp.arange(k.shape[0]) if rows is None else jnp.asarray(rows, jnp.int32)
        t = k.shape[1]
        return LayerKV(self.k.at[rows, :t].set(k), self.v.at[rows, :t].set(v))

    def append(self, k: jax.Array, v: jax.Array, positions: jax.Array, live: jax.Array | None = None,
               kernel: str | None = None) -> "LayerKV":
        """One token per row: k/v `[B, H_kv, D]` written at `positions` [B]. Rows whose `live` is False are
        not written (their position is pushed out of range and the write dropped). `kernel`: a kernel
        backend that writes K and V in one launch (`pallas_kernels.kv_append`); None: XLA's scatters."""
        use_kernel = kernel is not None and prefers_kv_append(self.k.shape[0], self.k.dtype)
        return LayerKV(*kv_append(self.k, self.v, k, v, positions.astype(jnp.int32), live,
                                  impl=kernel if use_kernel else "xla"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S_max, H_kv, D]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32: positions written for each row
    live: jax.Array | None = None  # [B] bool: rows that decode; None = every row

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, capacity: int, dtype) -> "KVCache":
        """An empty cache: no row live until a prefill writes it."""
        shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k, v, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in self.k + self.v)

    def live_rows(self) -> jax.Array:
        """[B] bool: the rows that decode."""
        return jnp.ones((self.batch,), bool) if self.live is None else self.live

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i])

    def with_layers(self, layers: Sequence[LayerKV], lengths: jax.Array, live: jax.Array | None) -> "KVCache":
        return KVCache(tuple(x.k for x in layers), tuple(x.v for x in layers), lengths.astype(jnp.int32), live)

    def with_live(self, live: jax.Array) -> "KVCache":
        """The same cache with another live mask (e.g. rows that finished stop decoding)."""
        return dataclasses.replace(self, live=jnp.asarray(live, bool))

    def insert(self, rows: jax.Array, other: "KVCache") -> "KVCache":
        """Writes every row of `other` (same layers and capacity) into slots `rows` of this cache, with its
        lengths and live flags; the other slots stay bit-identical."""
        rows = jnp.asarray(rows, jnp.int32)
        if other.capacity != self.capacity or other.num_layers != self.num_layers:
            raise ValueError(f"cannot insert a cache of {other.num_layers} layers x {other.capacity} positions "
                             f"into one of {self.num_layers} x {self.capacity}")
        layers = [LayerKV(a.at[rows].set(b.astype(a.dtype)), c.at[rows].set(d.astype(c.dtype)))
                  for a, b, c, d in zip(self.k, other.k, self.v, other.v)]
        return self.with_layers(layers, self.lengths.at[rows].set(other.lengths),
                                self.live_rows().at[rows].set(other.live_rows()))
