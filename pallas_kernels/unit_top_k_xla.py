"""XLA reference of `unit_top_k`, and the ranking rule itself.

`rank_units` / `top_units` are the one definition of the heads' per-sequence top-k: the masked evaluation
(`polar_jax.selection`) and the decode step's XLA path call them, and the Triton kernel computes the same
comparisons, so every path picks the same units, ties included (the lower index first)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rank_units(scores: jax.Array) -> jax.Array:
    """Rank of every unit within its row (0 = highest score; ties go to the lower index): [..., U]."""
    s = scores
    above = s[..., None, :] > s[..., :, None]  # [..., i, j]: unit j beats unit i
    u = s.shape[-1]
    j_before_i = jnp.arange(u)[None, :] < jnp.arange(u)[:, None]
    tie_before = (s[..., None, :] == s[..., :, None]) & j_before_i
    return jnp.sum(above | tie_before, axis=-1, dtype=jnp.int32)


def top_units(scores: jax.Array, k: int) -> jax.Array:
    """Per row, the k best units in score order ([..., U] -> [..., k] int32), without a sort (a row whose
    ranks miss a slot, as NaN scores can make, gets unit 0 there)."""
    ranks = rank_units(scores)
    hit = ranks[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., k, U]
    return jnp.argmax(hit, axis=-1).astype(jnp.int32)


def unit_top_k_xla(scores: jax.Array, k: int, bias: jax.Array | None, offset: int, units: int) -> jax.Array:
    logits = scores[:, offset:offset + units].astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return top_units(logits, k)
