"""Pallas (Triton backend) decode-step norms: one program per row, the whole row in registers.

At B=1 XLA runs a LayerNorm as three kernels (the mean, the variance, the normalised output that the
next Pallas GEMV reads), each a ~1.5 us launch for 8 KB of data: two LayerNorms per OPT layer are 6 of
the step's ~25 kernels per layer (benchmarks/results/decode_b1_2026-11-29_notes.md). Here it is one
kernel; the row's statistics are exact two-pass sums over values already in registers.

`add_row_norm` also finishes the previous projection (the sum of its split-K partials, its bias, the cast)
and adds it to the residual stream: at B=1 those were one more XLA kernel before every norm.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .backends import use_interpret
from .grid import pow2_at_least
from .split_sum import SplitSum
from .validation import check_kernel_dtype

F32 = jnp.float32


def _normalized(x, w, b_ref, ok, dp: int, D: int, kind: str, eps: float, out_dtype):
    """The norm of one row x [dp] (entries >= D masked), in `out_dtype`."""
    xf = x.astype(F32)
    if kind == "layer":
        mean = jnp.sum(xf) / D
        xc = jnp.where(ok, xf - mean, 0.0)
        y = xc * jax.lax.rsqrt(jnp.sum(xc * xc) / D + eps) * w.astype(F32)
        if b_ref is not None:
            y = y + plgpu.load(b_ref.at[pl.ds(0, dp)], mask=ok, other=0.0).astype(F32)
        return y.astype(out_dtype)
    # HF: normalised in float32, cast to the input dtype, then multiplied by the weight
    y = (xf * jax.lax.rsqrt(jnp.sum(xf * xf) / D + eps)).astype(x.dtype)
    return (w.astype(F32) * y.astype(F32)).astype(out_dtype)


def _norm_kernel(x_ref, w_ref, *rest, D: int, kind: str, eps: float, has_bias: bool):
    b_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    row = pl.program_id(0)
    dp = pow2_at_least(D, 16)
    ok = jnp.arange(dp, dtype=jnp.int32) < D
    x = plgpu.load(x_ref.at[row, pl.ds(0, dp)], mask=ok, other=0.0)
    w = plgpu.load(w_ref.at[pl.ds(0, dp)], mask=ok, other=0.0)
    plgpu.store(o_ref.at[row, pl.ds(0, dp)], _normalized(x, w, b_ref, ok, dp, D, kind, eps, o_ref.dtype), mask=ok)


def _add_norm_kernel(x_ref, p_ref, w_ref, *rest, D: int, S: int, kind: str, eps: float, delta_dtype,
                     has_delta_bias: bool, has_bias: bool):
    pos = 0
    db_ref = rest[pos] if has_delta_bias else None
    pos += int(has_delta_bias)
    b_ref = rest[pos] if has_bias else None
    xo_ref, o_ref = rest[-2], rest[-1]
    row = pl.program_id(0)
    dp = pow2_at_least(D, 16)
    ok = jnp.arange(dp, dtype=jnp.int32) < D
    delta = jnp.zeros((dp,), F32)
    for s in range(S):  # static: the partials' loads are independent and all in flight at once
        delta = delta + plgpu.load(p_ref.at[jnp.int32(s), row, pl.ds(0, dp)], mask=ok, other=0.0).astype(F32)
    if db_ref is not None:
        delta = delta + plgpu.load(db_ref.at[pl.ds(0, dp)], mask=ok, other=0.0).astype(F32)
    x = plgpu.load(x_ref.at[row, pl.ds(0, dp)], mask=ok, other=0.0)
    # the projection's output rounded to the stream's dtype as when it was materialised, then the residual add
    x_new = (x.astype(F32) + delta.astype(delta_dtype).astype(F32)).astype(x.dtype)
    plgpu.store(xo_ref.at[row, pl.ds(0, dp)], x_new, mask=ok)
    w = plgpu.load(w_ref.at[pl.ds(0, dp)], mask=ok, other=0.0)
    plgpu.store(o_ref.at[row, pl.ds(0, dp)], _normalized(x_new, w, b_ref, ok, dp, D, kind, eps, o_ref.dtype),
                mask=ok)


def _norm_out_dtype(x, weight, kind: str):
    return x.dtype if kind == "layer" else jnp.result_type(weight.dtype, x.dtype)


def _warps(D: int) -> int:
    return 4 if pow2_at_least(D, 16) <= 2048 else 8


@functools.partial(jax.jit, static_argnames=("eps", "kind", "interpret"))
def row_norm_triton(x, weight, bias, *, eps: float, kind: str, interpret: bool):
    M, D = x.shape
    return pl.pallas_call(
        functools.partial(_norm_kernel, D=D, kind=kind, eps=float(eps), has_bias=bias is not None),
        out_shape=jax.ShapeDtypeStruct((M, D), _norm_out_dtype(x, weight, kind)), grid=(M,), interpret=interpret,
        name=f"{kind}_norm", compiler_params=plgpu.CompilerParams(num_warps=_warps(D), num_stages=1),
    )(x, weight, *([bias] if bias is not None else []))


@functools.partial(jax.jit, static_argnames=("eps", "kind", "interpret"))
def add_row_norm_triton(x, delta: SplitSum, weight, bias, *, eps: float, kind: str, interpret: bool):
    M, D = x.shape
    has_db, has_b = delta.bias is not None, bias is not None
    kernel = functools.partial(_add_norm_kernel, D=D, S=delta.parts.shape[0], kind=kind, eps=float(eps),
                               delta_dtype=delta.dtype, has_delta_bias=has_db, has_bias=has_b)
    return pl.pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct((M, D), x.dtype),
                           jax.ShapeDtypeStruct((M, D), _norm_out_dtype(x, weight, kind))),
        grid=(M,), interpret=interpret, name=f"add_{kind}_norm",
        compiler_params=plgpu.CompilerParams(num_warps=_warps(D), num_stages=1),
    )(x, delta.parts, weight, *([delta.bias] if has_db else []), *([bias] if has_b else []))


def add_row_norm(x, delta: SplitSum, weight, bias, eps: float, kind: str):
    """Backend entry point (validated by row_norm.add_row_norm)."""
    check_kernel_dtype(x.dtype, use_interpret())
    return add_row_norm_triton(x, delta, weight, bias, eps=eps, kind=kind, interpret=use_interpret())


def row_norm(x, weight, bias, eps: float, kind: str):
    """Backend entry point (validated by row_norm.row_norm)."""
    check_kernel_dtype(x.dtype, use_interpret())
    return row_norm_triton(x, weight, bias, eps=eps, kind=kind, interpret=use_interpret())
