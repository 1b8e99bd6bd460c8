"""Top-k helpers shared by the masked-evaluation sparsifiers and the decode selectors, so both choose the
same units from the same scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """0/1 float mask over the last axis with exactly k ones (the k largest scores; ties by index)."""
    _, idx = jax.lax.top_k(scores, k)
    return jnp.sum(jax.nn.one_hot(idx, scores.shape[-1], dtype=jnp.float32), axis=-2)


def topk_index(scores: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


def batch_union_scores(logits: jax.Array) -> jax.Array:
    """MLP scores shared by a decode batch (PAPER.md method 2): ReLU'd router logits summed over the batch
    rows (axis 0), so one index vector serves every row."""
    return jnp.sum(jax.nn.relu(logits), axis=0)


def keep_prefix_dense(mask: jax.Array, start: int, time_axis: int = 1) -> jax.Array:
    """Positions before `start` stay dense (the prompt is prefilled densely); mask [..., T, ...]."""
    if start <= 0:
        return mask
    t = mask.shape[time_axis]
    shape = [1] * mask.ndim
    shape[time_axis] = t
    before = (jnp.arange(t) < start).reshape(shape)
    return jnp.where(before, 1.0, mask)
