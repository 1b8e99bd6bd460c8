"""XLA reference of the decode step's cache append: one token per row written into the K and V caches."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def kv_append_xla(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                  live: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row b's k/v [H, D] written at position positions[b] of its cache [S, H, D]; rows that are not live, or
    whose position is outside [0, S), are left unchanged."""
    b, s = k_cache.shape[:2]
    pos = jnp.where(live, positions.astype(jnp.int32), s)
    pos = jnp.where(pos < 0, s, pos)
    rows = jnp.arange(b)
    return (k_cache.at[rows, pos].set(k.astype(k_cache.dtype), mode="drop"),
            v_cache.at[rows, pos].set(v.astype(v_cache.dtype), mode="drop"))
