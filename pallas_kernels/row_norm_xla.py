"""XLA reference of the decode-step norms: LayerNorm (two-pass, as torch) and RMSNorm (HF's rounding), and
of `add_row_norm` (a sublayer's pending output added to the residual stream, then the norm)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .split_sum import SplitSum

KINDS = ("layer", "rms")
F32 = jnp.float32


def row_norm_xla(x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float, kind: str) -> jax.Array:
    """x [..., D] -> [..., D] (any leading axes). "layer": ((x - mean) / sqrt(var + eps)) * w + b in float32,
    cast to x's dtype.
    "rms": x / sqrt(mean(x^2) + eps) cast to x's dtype first, then times w (HF's order)."""
    xf = x.astype(F32)
    if kind == "layer":
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + eps) * weight.astype(F32)
        if bias is not None:
            y = y + bias.astype(F32)
        return y.astype(x.dtype)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return weight * y


def add_row_norm_xla(x: jax.Array, delta: SplitSum, weight: jax.Array, bias: jax.Array | None, eps: float,
                     kind: str) -> tuple[jax.Array, jax.Array]:
    """x [M, D] + the finished delta (rounded to its dtype first, as a materialised output is) -> (that sum,
    its norm)."""
    x_new = x + delta.total()
    return x_new, row_norm_xla(x_new, weight, bias, eps, kind)
