"""Head/group-selective decode attention: public API, validation and dispatch.

q [B, Hq, D], k/v [B, S, Hkv, D] (the cache in its native layout), lengths [B], groups [B, A]
(KV-group index per slot), n_active [B] -> [B, Hq, D]. Query heads of group g are
g*(Hq//Hkv) ... (g+1)*(Hq//Hkv)-1 (HF convention). With all groups active it is dense decoding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import selective_attention_triton as tri
from .backends import dispatch
from .selective_attention_triton import default_scale
from .selective_attention_xla import select_decode_xla
from .validation import check_count, check_float, check_indices, check_int, check_ndim, check_same_dtype

Array = jax.Array


def check_select_decode(q, k, v, lengths, groups, n_active, window) -> None:
    check_ndim("q", q, 3)
    check_ndim("k", k, 4)
    check_ndim("v", v, 4)
    check_float("q", q)
    check_same_dtype(q=q, k=k, v=v)
    B, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {k.shape} and {v.shape}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v must be [B={B}, S, Hkv, D={D}], got {k.shape}")
    Hkv = k.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    check_ndim("groups", groups, 2)
    if groups.shape[0] != B:
        raise ValueError(f"groups must be [B={B}, A], got {groups.shape}")
    for name, a in (("lengths", lengths), ("n_active", n_active)):
        check_ndim(name, a, 1)
        if a.shape[0] != B:
            raise ValueError(f"{name} must have shape ({B},), got {a.shape}")
        check_int(name, a)
    check_int("groups", groups)
    check_count("n_active", n_active, groups.shape[1], "slots")
    check_count("lengths", lengths, k.shape[1], "S")
    check_indices("groups", groups, n_active, Hkv, "KV-group indices")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")


_IMPLS = {"xla": select_decode_xla, "triton": tri.select_decode}


def select_decode(q: Array, k: Array, v: Array, lengths: Array, groups: Array, n_active: Array,
                  sm_scale: float | None = None, window: int | None = None, impl: str = "auto") -> Array:
    """Flash decoding of one query token per sequence over the first lengths[b] cached keys
    (or only the last `window` of them), for the KV groups in the first n_active[b] slots of
    groups[b]. Heads of unselected groups are exactly zero; a group listed twice counts once."""
    check_select_decode(q, k, v, lengths, groups, n_active, window)
    scale = float(sm_scale) if sm_scale is not None else default_scale(q.shape[2])
    fn = dispatch("select_decode", _IMPLS, impl)
    return fn(q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(groups, jnp.int32),
              jnp.asarray(n_active, jnp.int32), scale, window)


__all__ = ["select_decode", "check_select_decode"]
