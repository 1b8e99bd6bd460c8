"""Pallas (Triton backend) cache append: one launch writes the new K and V rows of every sequence in place.

XLA runs the append of one layer as four kernels at B=1 (for K and for V: a select that keeps the old
row where the write must be dropped, and the in-place dynamic-update-slice), each ~1.2 us for 8 KB, and as
two scatters of ~2.9 us at B=16 (benchmarks/results/raw_2026-11-29b_h200/call1_*_profile.json). Here one
program per sequence stores its two [H, D] rows, masked when the row is not live; the caches are aliased
to the outputs, so nothing else is read or written.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .backends import use_interpret
from .grid import pow2_at_least
from .validation import check_kernel_dtype


def _append_kernel(kc_ref, vc_ref, k_ref, v_ref, pos_ref, live_ref, kc_out, vc_out, *, S: int, H: int, D: int):
    del kc_ref, vc_ref  # aliased to the outputs: only the new rows are written
    b = pl.program_id(0)
    hp, dp = pow2_at_least(H), pow2_at_least(D, 16)
    pos = pos_ref[b]
    write = (live_ref[b] != 0) & (pos >= 0) & (pos < S)
    at = jnp.clip(pos, 0, S - 1)
    ok = (jnp.arange(hp, dtype=jnp.int32)[:, None] < H) & (jnp.arange(dp, dtype=jnp.int32)[None, :] < D)
    store = ok & write
    for src, dst in ((k_ref, kc_out), (v_ref, vc_out)):
        row = plgpu.load(src.at[b, pl.ds(0, hp), pl.ds(0, dp)], mask=ok, other=0.0)
        plgpu.store(dst.at[b, at, pl.ds(0, hp), pl.ds(0, dp)], row.astype(dst.dtype), mask=store)


@functools.partial(jax.jit, static_argnames=("interpret",))
def kv_append_triton(k_cache, v_cache, k, v, positions, live, *, interpret: bool):
    B, S, H, D = k_cache.shape
    return pl.pallas_call(
        functools.partial(_append_kernel, S=S, H=H, D=D),
        out_shape=(jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        grid=(B,), input_output_aliases={0: 0, 1: 1}, interpret=interpret, name="kv_append",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    )(k_cache, v_cache, k, v, positions.astype(jnp.int32), live.astype(jnp.int32))


def kv_append(k_cache, v_cache, k, v, positions, live):
    """Backend entry point (validated by kv_append.kv_append)."""
    check_kernel_dtype(k_cache.dtype, use_interpret())
    return kv_append_triton(k_cache, v_cache, k, v, positions, live, interpret=use_interpret())
