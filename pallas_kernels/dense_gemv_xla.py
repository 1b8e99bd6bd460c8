"""XLA reference of the decode GEMV: y = act(x @ W + b), W in either storage layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .activations import get_activation

LAYOUTS = ("kn", "nk")  # "kn": W [K, N] (in, out); "nk": W [N, K] (out-major, e.g. neuron-major up)


def product_f32(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    """x [M, K] @ W -> [M, N] in float32 (the XLA reference of gemv_f32, and gemv_xla's accumulation)."""
    return jnp.einsum("mk,kn->mn" if layout == "kn" else "mk,nk->mn", x, w, preferred_element_type=jnp.float32)


def gemv_xla(x: jax.Array, w: jax.Array, bias: jax.Array | None, activation: str | None, layout: str) -> jax.Array:
    """x [M, K] -> [M, N] in x's dtype, float32 accumulation and epilogue."""
    y = product_f32(x, w, layout)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return get_activation(activation)(y).astype(x.dtype)
