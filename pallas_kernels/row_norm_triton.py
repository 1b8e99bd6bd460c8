"""Pallas (Triton backend) decode-step norm: one program per row, the whole row in registers.

At B=1 XLA runs a LayerNorm as three kernels (the mean, the variance, the normalised output that the
next Pallas GEMV reads), each a ~1.5 us launch for 8 KB of data: two LayerNorms per OPT layer are 6 of
the step's ~25 kernels per layer (benchmarks/results/decode_b1_2026-11-29_notes.md). Here it is one
kernel; the row's statistics are exact two-pass sums over values already in registers.
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

F32 = jnp.float32


def _norm_kernel(x_ref, w_ref, *rest, D: int, kind: str, eps: float, has_bias: bool):
    b_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    row = pl.program_id(0)
    dp = pow2_at_least(D, 16)
    ok = jnp.arange(dp, dtype=jnp.int32) < D
    x = plgpu.load(x_ref.at[row, pl.ds(0, dp)], mask=ok, other=0.0)
    xf = x.astype(F32)
    w = plgpu.load(w_ref.at[pl.ds(0, dp)], mask=ok, other=0.0)
    if kind == "layer":
        mean = jnp.sum(xf) / D
        xc = jnp.where(ok, xf - mean, 0.0)
        y = xc * jax.lax.rsqrt(jnp.sum(xc * xc) / D + eps) * w.astype(F32)
        if b_ref is not None:
            y = y + plgpu.load(b_ref.at[pl.ds(0, dp)], mask=ok, other=0.0).astype(F32)
        out = y.astype(o_ref.dtype)
    else:
        # HF: normalised in float32, cast to the input dtype, then multiplied by the weight
        y = (xf * jax.lax.rsqrt(jnp.sum(xf * xf) / D + eps)).astype(x.dtype)
        out = (w.astype(F32) * y.astype(F32)).astype(o_ref.dtype)
    plgpu.store(o_ref.at[row, pl.ds(0, dp)], out, mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "kind", "interpret"))
def row_norm_triton(x, weight, bias, *, eps: float, kind: str, interpret: bool):
    M, D = x.shape
    out_dtype = x.dtype if kind == "layer" else jnp.result_type(weight.dtype, x.dtype)
    warps = 4 if pow2_at_least(D, 16) <= 2048 else 8
    return pl.pallas_call(
        functools.partial(_norm_kernel, D=D, kind=kind, eps=float(eps), has_bias=bias is not None),
        out_shape=jax.ShapeDtypeStruct((M, D), out_dtype), grid=(M,), interpret=interpret, name=f"{kind}_norm",
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
    )(x, weight, *([bias] if bias is not None else []))


def row_norm(x, weight, bias, eps: float, kind: str):
    """Backend entry point (validated by row_norm.row_norm)."""
    check_kernel_dtype(x.dtype, use_interpret())
    return row_norm_triton(x, weight, bias, eps=eps, kind=kind, interpret=use_interpret())
