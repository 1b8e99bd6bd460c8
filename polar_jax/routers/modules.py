"""Router modules (Flax NNX).

- `MLPRouter`: low-rank linear classifier d -> r -> N, no bias and no nonlinearity (PAPER.md method 2);
  one logit per MLP neuron ("will this neuron's ReLU output be > 0").
- `AttentionRouter`: linear d -> U with bias; U = query heads (MHA) or KV groups (GQA), trained directly on
  group labels so the decode path gets one score per group it can skip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLPRouter(nnx.Module):
    def __init__(self, d: int, rank: int, n: int, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.a = nnx.Param(init(rngs.params(), (d, rank), jnp.float32))
        self.b = nnx.Param(init(rngs.params(), (rank, n), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return mlp_logits(self.a[...], self.b[...], x)


class AttentionRouter(nnx.Module):
    def __init__(self, d: int, units: int, rngs: nnx.Rngs):
        self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d, units), jnp.float32))
        self.b = nnx.Param(jnp.zeros((units,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return attn_logits(self.w[...], self.b[...], x)


# The same math as pure functions, used by the sparsifiers/selectors on raw weight arrays.
def mlp_logits(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return (x @ a) @ b


def attn_logits(w: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) @ w + b
