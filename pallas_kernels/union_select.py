"""Fused MLP router selection: `union_select(u, w, live, threshold, capacity)`.

The MLP router is low rank (d -> r -> N, PAPER.md): `u = x @ a` is [B, r] and the second matmul
`u @ w` gives every row's logit for every neuron. The batch computes the union of the neurons some live
row predicts active (logit > the layer's calibrated threshold), and the gather kernels want those
indices ascending (weight rows streamed in memory order). This op does all of it in one pass over w:
- returns (idx [capacity] int32, count int32): the first min(count, capacity) entries of idx are the
  kept neurons in ascending order, the rest are 0; count may exceed the capacity (the caller then
  runs the dense MLP), or is clamped to it with `clamp_count=True` (no extra kernel for the clamp).
`u` may be a slice of a wider array (`u_offset`: its first column) and float32 over 16-bit `w` (rounded
to w's dtype as it is read): at B=1 the router's first product is shared with the head router and
arrives as float32 columns of one array, and slicing and casting it were a kernel of their own.
It replaces `lax.top_k` over the batch-summed scores, which costs ~50 us per layer at N = 16384 on the
H200 whatever k is (benchmarks/results/decode_diag_2026-11-28.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import union_select_triton as tri
from .backends import dispatch
from .union_select_xla import union_select_xla
from .validation import check_float, check_ndim, check_same_dtype

Array = jax.Array
_IMPLS = {"xla": union_select_xla, "triton": tri.union_select}


W_LAYOUTS = ("rn", "nr")  # w stored [r, N] (rank-major) or [N, r] (neuron-major: each neuron's row contiguous)


def check_union_select(u, w, live, threshold, capacity, u_offset: int = 0, w_layout: str = "rn") -> None:
    check_ndim("u", u, 2)
    check_ndim("w", w, 2)
    check_float("u", u)
    check_float("w", w)
    if jnp.dtype(u.dtype) != jnp.dtype(jnp.float32):
        check_same_dtype(u=u, w=w)
    if not isinstance(u_offset, int) or u_offset < 0:
        raise ValueError(f"u_offset must be a non-negative int, got {u_offset!r}")
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"w_layout must be one of {W_LAYOUTS}, got {w_layout!r}")
    r, n = w.shape if w_layout == "rn" else w.shape[::-1]
    if u.shape[1] - u_offset != r:
        raise ValueError(f"u[:, u_offset:] is [B, r] and w ({w_layout}) {'[r, N]' if w_layout == 'rn' else '[N, r]'}: "
                         f"got u {u.shape} (u_offset {u_offset}) and w {w.shape}")
    check_ndim("live", live, 1)
    if live.shape[0] != u.shape[0]:
        raise ValueError(f"live must have shape ({u.shape[0]},), got {live.shape}")
    if jnp.ndim(threshold) != 0:
        raise ValueError(f"threshold must be a scalar, got shape {jnp.shape(threshold)}")
    if not isinstance(capacity, int) or not 1 <= capacity <= n:
        raise ValueError(f"capacity must be an int in [1, N={n}], got {capacity!r}")


def union_select(u: Array, w: Array, live: Array, threshold: Array | float, capacity: int,
                 impl: str = "auto", *, u_offset: int = 0, clamp_count: bool = False,
                 w_layout: str = "rn") -> tuple[Array, Array]:
    """(ascending indices of the neurons whose logit `u @ w` passes `threshold` in some live row, their
    count). u [B, u_offset + r] (w's dtype, or float32), w [r, N] (`w_layout` "rn") or [N, r] ("nr"),
    live [B] bool, threshold scalar, capacity static; `clamp_count`: the count is min(count, capacity)."""
    check_union_select(u, w, live, threshold, capacity, u_offset, w_layout)
    fn = dispatch("union_select", _IMPLS, impl)
    return fn(u, w, jnp.asarray(live, bool), jnp.asarray(threshold, jnp.float32), capacity, u_offset, bool(clamp_count),
              w_layout)
