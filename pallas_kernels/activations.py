"""Activation functions shared by the XLA references and the Pallas kernels.

Written with primitives the Pallas Triton lowering supports (it has no erf), so the same
function body runs inside kernels and in plain XLA. Compute in float32.
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", None)


def _erf(x: jnp.ndarray) -> jnp.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): the Triton lowering has no erf primitive,
    # and exact-erf GELU is what HF calls "gelu".
    a = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = 1.0 - poly * jnp.exp(-a * a)
    return jnp.where(x < 0, -y, y)


def relu(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.maximum(x, 0.0)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * x * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: jnp.ndarray) -> jnp.ndarray:
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * x * x * x)))


def silu(x: jnp.ndarray) -> jnp.ndarray:
    return x / (1.0 + jnp.exp(-x))


def identity(x: jnp.ndarray) -> jnp.ndarray:
    return x


def get_activation(name: str | None) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Activation by name ("relu", "gelu" (erf), "gelu_tanh", "silu" or None)."""
    table = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu, None: identity}
    if name not in table:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return table[name]
