"""XLA references for the selective GEMMs (any backend; float32 inputs allowed).

These gather the active weight rows with `jnp.take` (a copy of the active bytes) and run one
dense matmul on them with float32 accumulation. They define the math the kernels must match.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .activations import get_activation


def _active_mask(n_active: jax.Array, slots: int) -> jax.Array:
    return jnp.arange(slots, dtype=jnp.int32) < n_active


def _safe_idx(idx: jax.Array, n_rows: int) -> jax.Array:
    # Slots past n_active may hold anything; clip so the gather never reads out of range.
    return jnp.clip(idx, 0, n_rows - 1)


def gather_up_xla(x, w, idx, n_active, bias=None, activation="relu"):
    """out[:, j] = act(x . w[idx[j]] + bias[idx[j]]) for j < n_active, zeros elsewhere."""
    act = get_activation(activation)
    sel = _safe_idx(idx, w.shape[0])
    ws = jnp.take(w, sel, axis=0)
    y = jnp.dot(x, ws.T, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + jnp.take(bias, sel).astype(jnp.float32)[None, :]
    y = act(y)
    y = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], y, 0.0)
    return y.astype(x.dtype)


def gather_up_gated_xla(x, w_gate, w_up, idx, n_active):
    """silu(x . w_gate[idx]^T) * (x . w_up[idx]^T), zeros beyond n_active."""
    sel = _safe_idx(idx, w_gate.shape[0])
    g = jnp.dot(x, jnp.take(w_gate, sel, axis=0).T, preferred_element_type=jnp.float32)
    u = jnp.dot(x, jnp.take(w_up, sel, axis=0).T, preferred_element_type=jnp.float32)
    y = get_activation("silu")(g) * u
    y = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], y, 0.0)
    return y.astype(x.dtype)


def gather_down_xla(h, w, idx, n_active, bias=None):
    """sum_{j < n_active} h[:, j] * w[idx[j]] + bias (duplicates are summed twice)."""
    sel = _safe_idx(idx, w.shape[0])
    hm = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], h, jnp.zeros((), h.dtype))
    y = jnp.dot(hm, jnp.take(w, sel, axis=0), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(h.dtype)


def dense_up_then_take(x, w, idx, n_active, bias=None, activation="relu"):
    """Dense fallback: the full x . w^T (weights streamed once, cuBLAS-friendly), then the
    active columns. Used by `auto` when the active set is so dense that gathering is slower."""
    act = get_activation(activation)
    full = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
    sel = _safe_idx(idx, w.shape[0])
    y = jnp.take(full, sel, axis=1)
    if bias is not None:
        y = y + jnp.take(bias, sel).astype(jnp.float32)[None, :]
    y = act(y)
    y = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], y, 0.0)
    return y.astype(x.dtype)


def dense_gated_then_take(x, w_gate, w_up, idx, n_active):
    """Dense fallback of the gated variant."""
    sel = _safe_idx(idx, w_gate.shape[0])
    g = jnp.take(jnp.dot(x, w_gate.T, preferred_element_type=jnp.float32), sel, axis=1)
    u = jnp.take(jnp.dot(x, w_up.T, preferred_element_type=jnp.float32), sel, axis=1)
    y = get_activation("silu")(g) * u
    y = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], y, 0.0)
    return y.astype(x.dtype)


def dense_scatter_down(h, w, idx, n_active, bias=None):
    """Dense fallback of gather_down: scatter-add h into [M, N] (zeros elsewhere), one dense matmul."""
    sel = _safe_idx(idx, w.shape[0])
    hm = jnp.where(_active_mask(n_active, idx.shape[0])[None, :], h.astype(jnp.float32), 0.0)
    full = jnp.zeros((h.shape[0], w.shape[0]), jnp.float32).at[:, sel].add(hm)
    y = jnp.dot(full.astype(h.dtype), w, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(h.dtype)
