"""Pallas (Triton backend) per-sequence top-k of the attention units: one program per row.

A row has at most 128 units, so every pairwise comparison of the ranking ([U, U]) fits in registers: each
unit's rank is the count of units that beat it (a higher logit, or the same logit and a lower id), and the
unit of rank s is the one whose rank equals s. XLA made that two reduction kernels; this is one, and it
reads the router's raw product (a column offset into the shared first product, plus the bias) so neither
the slice nor the bias add is a kernel of its own.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .backends import use_interpret
from .grid import pow2_at_least

F32 = jnp.float32
MAX_UNITS = 128  # the [U, U] comparison tile of one program stays in registers


def _top_k_kernel(s_ref, *rest, U: int, K: int, offset: int, has_bias: bool):
    b_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    row = pl.program_id(0)
    up, kp = pow2_at_least(U, 16), pow2_at_least(K, 16)
    lanes = jnp.arange(up, dtype=jnp.int32)
    ok = lanes < U
    s = plgpu.load(s_ref.at[row, offset + lanes], mask=ok, other=0.0).astype(F32)
    if b_ref is not None:
        s = s + plgpu.load(b_ref.at[pl.ds(0, up)], mask=ok, other=0.0).astype(F32)
    # padding ranks after every real unit (it is -inf and has the higher ids); it can never be picked
    s = jnp.where(ok, s, -jnp.inf)
    beats = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (lanes[None, :] < lanes[:, None]))
    rank = jnp.sum(beats.astype(jnp.int32), axis=1)  # [up]: rank of unit i (row i of the tile)
    slots = jnp.arange(kp, dtype=jnp.int32)
    hit = (rank[None, :] == slots[:, None]) & ok[None, :]  # [kp, up]
    ids = jnp.min(jnp.where(hit, lanes[None, :], up), axis=1)
    ids = jnp.where(ids == up, 0, ids)  # a rank no unit holds (NaN logits): unit 0, as the XLA rule gives
    plgpu.store(o_ref.at[row, pl.ds(0, kp)], ids, mask=slots < K)


@functools.partial(jax.jit, static_argnames=("k", "offset", "units", "interpret"))
def unit_top_k_triton(scores, bias, *, k: int, offset: int, units: int, interpret: bool):
    B = scores.shape[0]
    up = pow2_at_least(units, 16)
    args = (scores,) if bias is None else (scores, bias)
    return pl.pallas_call(
        functools.partial(_top_k_kernel, U=units, K=k, offset=offset, has_bias=bias is not None),
        out_shape=jax.ShapeDtypeStruct((B, k), jnp.int32), grid=(B,), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=1 if up <= 32 else 4, num_stages=1), name="unit_top_k",
    )(*args)


def unit_top_k(scores, k: int, bias, offset: int, units: int):
    """Backend entry point (validated by unit_top_k.unit_top_k)."""
    return unit_top_k_triton(scores, bias, k=k, offset=offset, units=units, interpret=use_interpret())
