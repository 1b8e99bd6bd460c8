"""XLA reference of the fused MLP router selection (`union_select`): router logits, the union over live
rows of the neurons whose logit passes a threshold, and their ascending indices (stream compaction by a
cumulative sum: no sort)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def compact(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Ascending indices of the True entries of a 1-D mask in `capacity` slots (unused slots hold 0),
    and their count (which may exceed the capacity; only the first `capacity` are stored)."""
    n = mask.shape[0]
    pos = jnp.cumsum(mask.astype(jnp.int32)) - 1
    dest = jnp.where(mask & (pos < capacity), pos, capacity)
    idx = jnp.zeros((capacity,), jnp.int32).at[dest].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    return idx, (pos[-1] + 1).astype(jnp.int32)


def union_select_xla(u: jax.Array, w: jax.Array, live: jax.Array, threshold: jax.Array, capacity: int,
                     u_offset: int = 0, clamp: bool = False, w_layout: str = "rn"):
    w = w if w_layout == "rn" else w.T  # [r, N]
    u = u[:, u_offset:u_offset + w.shape[0]].astype(w.dtype)
    logits = jnp.dot(u, w, preferred_element_type=jnp.float32)  # [B, N]
    logits = jnp.where(live[:, None], logits, -jnp.inf)
    idx, count = compact(jnp.max(logits, axis=0) > threshold, capacity)
    return idx, (jnp.minimum(count, capacity) if clamp else count)
