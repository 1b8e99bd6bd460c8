"""Head-selective decode attention and the MLP router's selection as one op: `select_decode_union`.

Both read only what exists before the layer's attention (the cache with this step's keys, and the router
product of the layer input), so the Triton backend runs them in shared launches
(`attention_union_triton`): no launch of its own for the router's mask and compaction kernels, whose streaming
of the router matrix fills the bandwidth attention leaves idle. The XLA backend is the two ops one after the
other. Results are exactly those of `select_decode(q, k, v, lengths, groups, n_active, ...)` and
`union_select(u, w, live, threshold, capacity, ...)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import attention_union_triton as tri
from .attention_union_xla import select_decode_union_xla
from .backends import dispatch
from .selective_attention import check_select_decode
from .selective_attention_triton import default_scale
from .union_select import check_union_select

Array = jax.Array
_IMPLS = {"xla": select_decode_union_xla, "triton": tri.select_decode_union}


def select_decode_union(q: Array, k: Array, v: Array, lengths: Array, groups: Array, n_active: Array, u: Array,
                        w: Array, live: Array, threshold: Array | float, capacity: int, *,
                        sm_scale: float | None = None, window: int | None = None, u_offset: int = 0,
                        clamp_count: bool = False, w_layout: str = "rn",
                        impl: str = "auto") -> tuple[Array, Array, Array]:
    """(attention output [B, Hq, D], kept neuron ids [capacity], their count): `select_decode` over q, k, v,
    lengths, groups, n_active (sm_scale, window) and `union_select` over u, w, live, threshold, capacity
    (u_offset, clamp_count, w_layout), with the same arguments and checks as each."""
    check_select_decode(q, k, v, lengths, groups, n_active, window)
    check_union_select(u, w, live, threshold, capacity, u_offset, w_layout)
    scale = float(sm_scale) if sm_scale is not None else default_scale(q.shape[2])
    fn = dispatch("select_decode_union", _IMPLS, impl)
    return fn(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(groups, jnp.int32),
              jnp.asarray(n_active, jnp.int32), u, w, jnp.asarray(live, bool), jnp.asarray(threshold, jnp.float32),
              capacity, scale, window, u_offset, bool(clamp_count), w_layout)


__all__ = ["select_decode_union"]
