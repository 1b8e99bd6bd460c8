"""Pallas (Triton backend) GEMVs over attention units for the B=1 decode step.

At B=1 a layer's attention projections are four weight streams of ~34 MB (7B shapes) and the step is a
chain of ~20 small kernels per layer, so launches and split-K epilogues cost as much as bandwidth
lost (benchmarks/results/decode_b1_2026-11-29_notes.md). Two kernels here:

- `gemv_multi`: several (in, out) projections of the same x in one launch, every output written directly
  (no split-K partials): Q, K and V are one kernel; optionally with an out-major weight's float32 product
  too (the routers' first product at 17-32 rows: no launch, no split-K sum of its own). The first weight may be restricted to the columns of
  selected units (a unit = one KV group's query heads, `unit_width` columns): at B=1 with head sparsity
  only the selected heads' queries are ever read, so the other columns are neither read nor written
  (their values are unspecified).
- `gemv_rows`: x @ W over the rows of the selected units only (the output projection of the selected
  heads: the other heads' attention outputs are not computed, so their rows need not be read).

Unit ids come from a device array (the router's choice); the grid is static (the slot capacity) and
programs of slots past `n_active` exit at once.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .backends import use_interpret
from .dense_gemv_triton import MAX_M, GemvConfig, check_tile, gemv_smem, load_tile, row_tile
from .devices import DeviceClass, current_device_class
from .grid import cdiv, pow2_at_least
from .smem import fit_tiling
from .split_sum import SplitSum
from .validation import check_kernel_dtype

# The dense GEMV's tiling type and shared-memory estimate (the same x and weight tiles per k-step); for
# `gemv_rows`, `split_k` splits the reduction over the selected units' rows (f32 partials + one epilogue),
# for `gemv_multi` it is always 1 (every output written directly).


def choose_multi_config(K: int, columns: int, device: DeviceClass | None = None, rows: int = 1) -> GemvConfig:
    """64 columns per program where that still gives every SM a program, else 32 (more programs to keep
    HBM busy); 256-wide k-steps as in the dense GEMV's H200 sweep; 3 pipeline stages: in the B=1 decode
    step on the H200 they made OPT-6.7B's dense step 2.7 % and its heads + MLP step 5.7 % faster than 4
    stages (LLaMA-2-7B 2.1 % and 3.4 %), while 32-column programs or 6 stages were slower
    (benchmarks/results/raw_2026-11-29c_h200/call1_b1_*_variants.json). At 17-32 rows the 32-row x tile makes
    those tiles 147 KB of shared memory, one program per SM (OPT-6.7B's 192 programs: 1.45 waves); 128-wide
    k-steps with 4 stages fit two per SM: OPT-6.7B heads + MLP 0.7 % faster at B=32 and 0.8 % at B=24, dense
    0.2 % (H100, benchmarks/results/raw_2026-12-07c_h100/call1_variants_first_gemv.json, variant multi_k128)."""
    dev = device or current_device_class()
    block_n = 64 if cdiv(columns, 64) >= dev.num_sms else 32
    block_k, stages = (128, 4) if 16 < rows <= 32 else (256, 3)
    cfg = GemvConfig(block_n, min(block_k, pow2_at_least(K, 16)), 1, num_warps=4, num_stages=stages,
                     block_m=row_tile(rows))
    return fit_tiling(cfg, gemv_smem, dev.smem_per_block, "block_k", 32)


def choose_rows_config(unit_width: int, N: int, slots: int = 1, device: DeviceClass | None = None,
                       rows: int = 1) -> GemvConfig:
    """32 output columns per program (the output is only d wide), k-steps of one unit's rows or less, and
    the slots split 4 ways (f32 partials + one epilogue): a program that walks every selected head in
    turn is latency-bound. H200, B=1 decode step: 4 splits 3.2 % (OPT-6.7B, 9 heads) and 4.8 %
    (LLaMA-2-7B, 16 heads) faster than none, 2 splits half that
    (benchmarks/results/raw_2026-11-29b_h200/call3_step_variants_b1.json)."""
    dev = device or current_device_class()
    cfg = GemvConfig(min(32, pow2_at_least(N, 16)), min(128, pow2_at_least(unit_width, 16)), max(1, min(4, slots)),
                     num_warps=4, num_stages=4, block_m=row_tile(rows))
    return fit_tiling(cfg, gemv_smem, dev.smem_per_block, "block_k", 16)


def _column_block(x_ref, w_ref, b_ref, o_ref, n0, *, M, K, N, bm, bn, bk, n_ragged):
    """o[:, n0:n0+bn] = x @ w[:, n0:n0+bn] (+ b), the reduction in bk steps."""
    n_ok = (n0 + jnp.arange(bn, dtype=jnp.int32)) < N
    m_ok = jnp.arange(bm, dtype=jnp.int32) < M
    k_ragged = K % bk != 0

    def body(kb, acc):
        k0 = kb * bk
        k_ok = (k0 + jnp.arange(bk, dtype=jnp.int32)) < K
        x_mask = m_ok[:, None] & k_ok[None, :] if k_ragged else jnp.broadcast_to(m_ok[:, None], (bm, bk))
        xt = plgpu.load(x_ref.at[pl.ds(0, bm), pl.ds(k0, bk)], mask=x_mask, other=0.0)
        w_mask = jnp.broadcast_to(k_ok[:, None] & n_ok[None, :], (bk, bn)) if (k_ragged or n_ragged) else None
        return acc + plgpu.dot(xt, load_tile(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], w_mask))

    acc = jax.lax.fori_loop(0, cdiv(K, bk), body, jnp.zeros((bm, bn), jnp.float32))
    if b_ref is not None:
        acc = acc + plgpu.load(b_ref.at[pl.ds(n0, bn)], mask=n_ok, other=0.0).astype(jnp.float32)[None, :]
    plgpu.store(o_ref.at[pl.ds(0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=m_ok[:, None] & n_ok[None, :])


def _row_block(x_ref, w_ref, o_ref, n0, *, M, K, N, bm, bn, bk):
    """o[:, n0:n0+bn] = x @ w[n0:n0+bn, :].T for an out-major w [N, K] (rows contiguous), float32 out."""
    n_ok = (n0 + jnp.arange(bn, dtype=jnp.int32)) < N
    m_ok = jnp.arange(bm, dtype=jnp.int32) < M

    def body(kb, acc):
        k0 = kb * bk
        k_ok = (k0 + jnp.arange(bk, dtype=jnp.int32)) < K
        xt = plgpu.load(x_ref.at[pl.ds(0, bm), pl.ds(k0, bk)], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = plgpu.load(w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        return acc + plgpu.dot(xt, wt, trans_b=True)

    acc = jax.lax.fori_loop(0, cdiv(K, bk), body, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(o_ref.at[pl.ds(0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=m_ok[:, None] & n_ok[None, :])


def _multi_kernel(*refs, M, K, Ns, has_bias, gather, width, cap, cfg: GemvConfig, n_f32: int = 0):
    n_w = len(Ns)
    x_ref, w_refs = refs[0], refs[1:1 + n_w]
    f32_ref = refs[1 + n_w] if n_f32 else None
    pos = 1 + n_w + int(bool(n_f32))
    b_refs = []
    for hb in has_bias:
        b_refs.append(refs[pos] if hb else None)
        pos += int(hb)
    if gather:
        units_ref, nact_ref = refs[pos], refs[pos + 1]
        pos += 2
    o_refs = refs[pos:]
    bn, bk = cfg.block_n, cfg.block_k
    p = pl.program_id(0)
    start = 0
    for i, N in enumerate(Ns):
        if i == 0 and gather:
            per_unit = width // bn
            blocks = cap * per_unit
        else:
            blocks = cdiv(N, bn)
        lo, hi = start, start + blocks
        start = hi
        common = dict(M=M, K=K, N=N, bm=cfg.block_m, bn=bn, bk=bk)

        if i == 0 and gather:
            @pl.when((p >= lo) & (p < hi))
            def _(lo=lo, per_unit=per_unit, common=common):
                slot = (p - lo) // per_unit if per_unit > 1 else p - lo

                @pl.when(slot < nact_ref[0])
                def _():
                    part = ((p - lo) % per_unit) * bn if per_unit > 1 else 0
                    n0 = units_ref[slot] * width + part
                    _column_block(x_ref, w_refs[0], b_refs[0], o_refs[0], n0, n_ragged=False, **common)
        else:
            @pl.when((p >= lo) & (p < hi))
            def _(i=i, lo=lo, common=common, N=N):
                _column_block(x_ref, w_refs[i], b_refs[i], o_refs[i], (p - lo) * bn, n_ragged=N % bn != 0,
                              **common)
    if n_f32:  # the out-major float32 product's row blocks, after the (in, out) weights' column blocks
        @pl.when(p >= start)
        def _():
            _row_block(x_ref, f32_ref, o_refs[n_w], (p - start) * bn, M=M, K=K, N=n_f32, bm=cfg.block_m, bn=bn,
                       bk=bk)


@functools.partial(jax.jit, static_argnames=("width", "cfg", "interpret"))
def gemv_multi_triton(x, ws, biases, units, n_active, f32_nk=None, *, width, cfg: GemvConfig, interpret: bool):
    """`f32_nk`: an out-major [N, K] weight whose product x @ W.T is one more output, in float32 (its row
    blocks are programs of the same launch)."""
    M, K = x.shape
    Ns = tuple(w.shape[1] for w in ws)
    gather = units is not None
    cap = units.shape[0] if gather else 0
    n_f32 = 0 if f32_nk is None else f32_nk.shape[0]
    blocks = sum((cap * (width // cfg.block_n)) if (i == 0 and gather) else cdiv(N, cfg.block_n)
                 for i, N in enumerate(Ns)) + cdiv(n_f32, cfg.block_n)
    has_bias = tuple(b is not None for b in biases)
    kernel = functools.partial(_multi_kernel, M=M, K=K, Ns=Ns, has_bias=has_bias, gather=gather, width=width,
                               cap=cap, cfg=cfg, n_f32=n_f32)
    extra = [units, jnp.reshape(n_active, (1,)).astype(jnp.int32)] if gather else []
    out_shape = tuple(jax.ShapeDtypeStruct((M, N), x.dtype) for N in Ns)
    if n_f32:
        out_shape += (jax.ShapeDtypeStruct((M, n_f32), jnp.float32),)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(blocks,),
        interpret=interpret, name="gemv_multi_router" if n_f32 else "gemv_multi",
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(x, *ws, *([f32_nk] if n_f32 else []), *[b for b in biases if b is not None], *extra)


def _rows_kernel(x_ref, w_ref, *rest, M, N, width, cap, has_bias, cfg: GemvConfig):
    b_ref = rest[0] if has_bias else None
    units_ref, nact_ref, o_ref = rest[-3], rest[-2], rest[-1]
    bm, bn, bk, split = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    n0 = pl.program_id(0) * bn
    n_ok = (n0 + jnp.arange(bn, dtype=jnp.int32)) < N
    m_ok = jnp.arange(bm, dtype=jnp.int32) < M
    steps = cdiv(width, bk)
    per_split = cdiv(cap, split)
    first = pl.program_id(1) * per_split if split > 1 else 0
    n_live = nact_ref[0]

    def body(j, acc):
        slot, kb = (j, 0) if steps == 1 else (j // steps, j % steps)  # (Triton's lowering of `% 1` breaks)
        slot = slot + first
        live = slot < jnp.minimum(n_live, cap)
        k_ok = (kb * bk + jnp.arange(bk, dtype=jnp.int32) < width) & live
        k0 = units_ref[jnp.minimum(slot, cap - 1)] * width + kb * bk
        xt = plgpu.load(x_ref.at[pl.ds(0, bm), pl.ds(k0, bk)], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = plgpu.load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        return acc + plgpu.dot(xt, wt)

    acc = jax.lax.fori_loop(0, per_split * steps, body, jnp.zeros((bm, bn), jnp.float32))
    store_mask = m_ok[:, None] & n_ok[None, :]
    if split > 1:
        plgpu.store(o_ref.at[pl.program_id(1), pl.ds(0, bm), pl.ds(n0, bn)], acc, mask=store_mask)
        return
    if b_ref is not None:
        acc = acc + plgpu.load(b_ref.at[pl.ds(n0, bn)], mask=n_ok, other=0.0).astype(jnp.float32)[None, :]
    plgpu.store(o_ref.at[pl.ds(0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=store_mask)


@functools.partial(jax.jit, static_argnames=("width", "cfg", "interpret", "defer"))
def gemv_rows_triton(x, w, bias, units, n_active, *, width, cfg: GemvConfig, interpret: bool, defer: bool = False):
    """`defer`: return a `SplitSum` (the slot ranges' partials and the bias, no epilogue)."""
    M = x.shape[0]
    N = w.shape[1]
    split = cfg.split_k
    kernel = functools.partial(_rows_kernel, M=M, N=N, width=width, cap=units.shape[0],
                               has_bias=bias is not None and split == 1, cfg=cfg)
    out_shape = (jax.ShapeDtypeStruct((M, N), x.dtype) if split == 1
                 else jax.ShapeDtypeStruct((split, M, N), jnp.float32))
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(cdiv(N, cfg.block_n), split), interpret=interpret, name="gemv_rows",
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(x, w, *([bias] if bias is not None and split == 1 else []), units,
      jnp.reshape(n_active, (1,)).astype(jnp.int32))
    if split == 1:
        return SplitSum.finished(out) if defer else out
    if defer:
        return SplitSum.of_partials(out, bias, M, N, x.dtype)
    y = jnp.sum(out, axis=0)  # one fused XLA epilogue: the slot ranges' partials, the bias, the cast
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(x.dtype)


def gemv_multi(x, ws, biases, units=None, n_active=None, width: int | None = None, f32_nk=None,
               config: GemvConfig | None = None):
    """Backend entry point (the public op in unit_gemv.py validates first). The tiling is that of the (in, out)
    weights' columns: the float32 product's rows add programs of the same shape."""
    check_kernel_dtype(x.dtype, use_interpret())
    columns = sum(w.shape[1] for w in ws)
    cfg = config or choose_multi_config(x.shape[1], columns, rows=x.shape[0])
    check_tile(cfg, x.shape[0])
    if units is not None and width % cfg.block_n:
        cfg = dataclasses.replace(cfg, block_n=16 if width % 32 else 32)
    return gemv_multi_triton(x, tuple(ws), tuple(biases), units, n_active, f32_nk, width=width, cfg=cfg,
                             interpret=use_interpret())


def gemv_rows(x, w, bias, units, n_active, width: int, config: GemvConfig | None = None, defer: bool = False):
    check_kernel_dtype(x.dtype, use_interpret())
    cfg = config or choose_rows_config(width, w.shape[1], units.shape[0], rows=x.shape[0])
    check_tile(cfg, x.shape[0])
    return gemv_rows_triton(x, w, bias, units, n_active, width=width, cfg=cfg, interpret=use_interpret(),
                            defer=defer)
