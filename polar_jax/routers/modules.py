"""Router modules (Flax NNX).

- `MLPRouter`: low-rank linear classifier d -> r -> N, no bias and no nonlinearity (PAPER.md method 2);
  one logit per MLP neuron ("will this neuron's ReLU output be > 0").
- `AttentionRouter`: linear d -> U with bias, or with `hidden` h > 0 one hidden layer d -> h (ReLU) -> U
  with biases (the paper's MLP routers); U = query heads (MHA) or KV groups (GQA), trained directly on
  group labels so the decode path gets one score per group it can skip.

Both call the pure functions of `polar_jax.routers.logits`; the sparsifiers, selectors and calibration
call `attn_logits` on the bundle's arrays, so the attention router's math has one implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from polar_jax.routers.logits import attn_logits, mlp_logits


class MLPRouter(nnx.Module):
    def __init__(self, d: int, rank: int, n: int, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.a = nnx.Param(init(rngs.params(), (d, rank), jnp.float32))
        self.b = nnx.Param(init(rngs.params(), (rank, n), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return mlp_logits(self.a[...], self.b[...], x)


class AttentionRouter(nnx.Module):
    """Logits over U attention units. `hidden` 0: x @ w + b with w [d, U]; `hidden` h > 0:
    relu(x @ w1 + b1) @ w + b with w1 [d, h], b1 [h], w [h, U] (the bundle stores the same names)."""

    def __init__(self, d: int, units: int, rngs: nnx.Rngs, hidden: int = 0):
        init = nnx.initializers.lecun_normal()
        self.hidden = hidden
        if hidden:
            # He-style scale would suit ReLU too; lecun keeps the linear router's initialisation for w.
            self.w1 = nnx.Param(init(rngs.params(), (d, hidden), jnp.float32))
            self.b1 = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        self.w = nnx.Param(init(rngs.params(), (hidden or d, units), jnp.float32))
        self.b = nnx.Param(jnp.zeros((units,), jnp.float32))

    def arrays(self) -> tuple[jax.Array, ...]:
        """(w, b) or (w, b, w1, b1): the arguments of `attn_logits` after x, as a bundle stores them."""
        out = (self.w[...], self.b[...])
        return out + (self.w1[...], self.b1[...]) if self.hidden else out

    def __call__(self, x: jax.Array) -> jax.Array:
        return attn_logits(x, *self.arrays())
