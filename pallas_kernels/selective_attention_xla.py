"""XLA references for head/group-selective decode attention (any backend; float32 allowed).

`select_decode_xla` gathers the KV of each sequence's active groups (a copy of the active bytes)
and attends over them; `dense_decode_xla` is the plain dense decode over all heads (the baseline
the selective kernel is compared with). Both mask keys past each sequence's live length and,
with a sliding window, keys older than the window.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .slots import scatter_slots


def _key_mask(lengths, S: int, window: int | None):
    pos = jnp.arange(S, dtype=jnp.int32)[None, :]
    L = jnp.clip(lengths.astype(jnp.int32), 0, S)[:, None]
    ok = pos < L
    if window is not None:
        ok = ok & (pos >= L - window)
    return ok  # [B, S]


def select_decode_xla(q, k, v, lengths, groups, n_active, sm_scale: float, window=None):
    B, Hq, D = q.shape
    _, S, Hkv, _ = k.shape
    A = groups.shape[1]
    G = Hq // Hkv
    g = jnp.clip(groups.astype(jnp.int32), 0, Hkv - 1)  # [B, A]
    # Gather the active groups' cache: [B, S, A, D] (the reference pays for this copy).
    kg = jnp.take_along_axis(k, g[:, None, :, None], axis=2)
    vg = jnp.take_along_axis(v, g[:, None, :, None], axis=2)
    qg = jnp.take_along_axis(q.reshape(B, Hkv, G, D), g[:, :, None, None], axis=1)  # [B, A, G, D]
    s = jnp.einsum("bagd,bsad->bags", qg, kg, preferred_element_type=jnp.float32) * sm_scale
    ok = _key_mask(lengths, S, window)[:, None, None, :]
    s = jnp.where(ok, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))
    den = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bags,bsad->bagd", p.astype(v.dtype), vg, preferred_element_type=jnp.float32)
    o = jnp.where(den > 0, o / jnp.where(den > 0, den, 1.0), 0.0)
    return scatter_slots(o, groups.astype(jnp.int32), n_active.astype(jnp.int32), Hkv, q.dtype)


def dense_decode_xla(q, k, v, lengths, sm_scale: float, window=None):
    """Dense decode attention over all heads (GQA by grouping query heads), no selection."""
    B, Hq, D = q.shape
    _, S, Hkv, _ = k.shape
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, D)
    s = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=jnp.float32) * sm_scale
    ok = _key_mask(lengths, S, window)[:, None, None, :]
    s = jnp.where(ok, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))
    den = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgs,bshd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = jnp.where(den > 0, o / jnp.where(den > 0, den, 1.0), 0.0)
    return o.reshape(B, Hq, D).astype(q.dtype)
