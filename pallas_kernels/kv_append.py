"""Decode-step cache append: `kv_append(k_cache, v_cache, k, v, positions, live)` writes each sequence's new
K and V rows ([B, H, D]) at its position of the [B, S, H, D] caches, in one kernel (see kv_append_triton.py
for why); rows that are not live, or whose position is outside the cache, are left unchanged."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kv_append_triton as tri
from .backends import dispatch, use_interpret
from .kv_append_xla import kv_append_xla
from .validation import KERNEL_DTYPES, check_float, check_int, check_ndim

Array = jax.Array
_IMPLS = {"xla": kv_append_xla, "triton": tri.kv_append}


def check_kv_append(k_cache, v_cache, k, v, positions, live) -> None:
    for name, a, nd in (("k_cache", k_cache, 4), ("v_cache", v_cache, 4), ("k", k, 3), ("v", v, 3)):
        check_ndim(name, a, nd)
        check_float(name, a)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache differ: {k_cache.shape} {k_cache.dtype} vs {v_cache.shape} {v_cache.dtype}")
    B, _, H, D = k_cache.shape
    for name, a in (("k", k), ("v", v)):
        if tuple(a.shape) != (B, H, D):
            raise ValueError(f"{name} must have shape {(B, H, D)} (one token per cache row), got {tuple(a.shape)}")
    for name, a in (("positions", positions), ("live", live)):
        check_ndim(name, a, 1)
        if a.shape[0] != B:
            raise ValueError(f"{name} must have shape ({B},), got {tuple(a.shape)}")
    check_int("positions", positions)


def kv_append(k_cache: Array, v_cache: Array, k: Array, v: Array, positions: Array, live: Array | None = None,
              impl: str = "auto") -> tuple[Array, Array]:
    """(k_cache, v_cache) with row b's k[b], v[b] written at positions[b] where live[b] (default: every row).
    Inside a jitted step whose caches are donated the Triton path writes them in place."""
    live = jnp.ones(k_cache.shape[:1], bool) if live is None else jnp.asarray(live, bool)
    check_kv_append(k_cache, v_cache, k, v, positions, live)
    return dispatch("kv_append", _IMPLS, impl)(k_cache, v_cache, k, v, positions, live)


# Batch sizes up to which the decode step appends with `kv_append` instead of XLA's scatters. H200, same-process
# A/B (benchmarks/results/raw_2026-11-29c_h200/call6_*_variants.json): OPT-6.7B B=1 dense 1.7 % and heads + MLP
# 2.8 % faster, LLaMA-2-7B B=16 0.3-0.4 %; no batch size was slower.
KV_APPEND_MAX_B = 1024


def prefers_kv_append(batch: int, dtype=jnp.bfloat16) -> bool:
    """True where the decode step should append with `kv_append`: batch in range, and a cache dtype the
    kernel runs on the GPU (16-bit; float32 only in interpret mode)."""
    return 1 <= batch <= KV_APPEND_MAX_B and (jnp.dtype(dtype) in KERNEL_DTYPES or use_interpret())
