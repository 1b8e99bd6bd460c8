"""Router logits from raw router arrays.

`attn_logits` is the one place the attention router's math lives: the trainer (through the NNX module),
calibration, the accuracy scripts, the masked-evaluation sparsifier and the decode selector all call it,
so a linear and a hidden-layer router are computed by the same code on every path. (The sparsifiers'
MLP-router path keeps its own transposed layout for decode speed; see `sparsify._Routers._mlp_hidden`.)
Pure `jax.numpy` (NumPy arrays are accepted), no Flax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attn_logits(x: jax.Array, w: jax.Array, b: jax.Array, w1: jax.Array | None = None,
                b1: jax.Array | None = None) -> jax.Array:
    """Attention-router logits [..., U] in float32 from router input x [..., d]. Linear: x @ w + b;
    with a hidden layer (w1 and b1 given): relu(x @ w1 + b1) @ w + b. The weights may be a lower
    precision (the decode path stores them in the model's dtype): products accumulate in float32."""
    if (w1 is None) != (b1 is None):
        raise ValueError("attn_logits: the hidden layer needs both w1 and b1")
    if w1 is not None:
        h = jnp.dot(x.astype(w1.dtype), w1, preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
        x = jax.nn.relu(h)
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)


def mlp_logits(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    """MLP-router logits [..., N]: the low-rank linear map (x @ a) @ b in float32."""
    x = x.astype(jnp.float32)
    return (x @ a) @ b
