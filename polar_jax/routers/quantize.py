"""Int8 router weights for decoding: symmetric, one float32 scale per output.

The MLP router is read in full at every decode step: at OPT-6.7B's rank 1024 its two matrices are 41.5 MB
per layer in bf16, more than the 7.5 % of the MLP that B=1 decoding reads
(benchmarks/results/decode_b1_2026-11-29_notes.md). The router only ranks neurons against a threshold, so
8-bit weights (half the bytes) with per-output scales keep its decisions: each logit is a sum over the
rank of products whose rounding errors are independent, so the relative error of a logit is far below
that of one weight.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def int8_per_output(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(q int8, scale float32) with w ~ q * scale, one scale per slice along `axis` (the output axis: the
    scales multiply the finished sums). An all-zero slice gets scale 1 (q = 0)."""
    w = jnp.asarray(w, jnp.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = jnp.max(jnp.abs(w), axis=reduce)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, reduce)), -127, 127).astype(jnp.int8)
    return q, scale
