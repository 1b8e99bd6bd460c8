"""Pallas (Triton backend) GEMV for decode-sized M: y = act(x @ W + b) with W in either layout.

At M <= 32 a projection is a pure weight stream: every program owns `block_n` output columns and
walks the reduction in `block_k` steps, loading one weight tile per step (rows of the out-major
layout, or row segments of the (in, out) layout) with `num_stages` loads in flight. When the columns
alone give too few programs to keep HBM busy, the reduction is split over `split_k` programs whose
float32 partials one fused XLA epilogue sums (with the bias and the activation). The x tile is padded
to 16 rows (the smallest `tl.dot` operand) or, above 16 rows, 32; the wasted MACs are free in a
memory-bound kernel.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .activations import get_activation
from .backends import use_interpret
from .devices import DeviceClass, current_device_class
from .grid import cdiv, pow2_at_least
from .smem import fit_tiling, staged_bytes
from .split_sum import SplitSum
from .validation import check_kernel_dtype

MAX_M = 32  # one x tile of every row; larger M is not a GEMV (the dense path uses XLA's GEMM there)


def row_tile(M: int) -> int:
    """Rows of the x tile for M rows: 16 (the smallest `tl.dot` operand) up to 16, else 32."""
    return 16 if M <= 16 else 32


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    block_m: int = 16  # rows of the x tile (>= M; `row_tile`)


def check_tile(cfg: GemvConfig, M: int) -> None:
    """ValueError unless the config's x tile holds every one of the M rows."""
    if cfg.block_m < M:
        raise ValueError(f"the x tile has {cfg.block_m} rows (block_m), fewer than M={M}")


def gemv_smem(cfg: GemvConfig) -> int:
    """Shared memory: per k-step an x tile [block_m, block_k] and a weight tile [block_n, block_k]."""
    return staged_bytes(cfg.num_stages, (cfg.block_m + cfg.block_n) * cfg.block_k)


def choose_gemv_config(M: int, K: int, N: int, layout: str, device: DeviceClass | None = None) -> GemvConfig:
    """Static tiling from the shapes, from the H200 sweep (2026-11-29, benchmarks/results/gemv_probe_2026-11-29.md):
    256-wide k-steps and 4 warps everywhere. Out-major ("nk") weights: no split, 64 columns per program
    when that still gives 1.5 programs per SM, else 32 (OPT up 34.0 us, LLaMA up 24.1 us at M=1).
    (in, out) ("kn") weights: about one program per SM, 64 columns and two k-splits where the k-blocks
    divide evenly, else 32 columns (4096x4096: 11.2 us; 16384->4096: 33.3 us; 11008->4096: 26.0 us)."""
    dev = device or current_device_class()
    block_k = min(256, pow2_at_least(K, 16))
    n_kb = cdiv(K, block_k)
    if layout == "nk":
        block_n = 64 if cdiv(N, 64) * 2 >= 3 * dev.num_sms else 32
        cfg = GemvConfig(min(block_n, pow2_at_least(N, 16)), block_k, 1, num_warps=4, num_stages=3, block_m=row_tile(M))
    else:
        best = None
        for block_n in (64, 32):
            for split in (2, 1):
                if n_kb % split:
                    continue
                programs = cdiv(N, block_n) * split
                if programs <= dev.num_sms * 9 // 8 and (best is None or programs > best[0]):
                    best = (programs, block_n, split)
        _, block_n, split = best or (0, 64, 1)
        cfg = GemvConfig(min(block_n, pow2_at_least(N, 16)), block_k, split, num_warps=4, num_stages=4,
                         block_m=row_tile(M))
    return fit_tiling(cfg, gemv_smem, dev.smem_per_block, "block_k", 32)


def choose_f32_config(M: int, K: int, N: int, layout: str, device: DeviceClass | None = None) -> GemvConfig:
    """Tiling for a narrow product whose consumer wants float32 (`gemv_f32`, the routers' first product): 32
    columns per program and, wherever K has two k-blocks or more, the reduction split over at least two
    programs (float32 partials), as many splits as keep the programs within about one per SM. Rank 1024 + 32
    head columns at d=4096: 33 column blocks x 4 splits of 4 k-steps."""
    dev = device or current_device_class()
    block_k = 256
    while block_k > 16 and cdiv(K, block_k) < 2:  # at least two k-blocks to split where K allows
        block_k //= 2
    n_kb = cdiv(K, block_k)
    cols = cdiv(N, 32)
    split = 1
    for s in range(2, n_kb + 1):
        if n_kb % s == 0 and (split == 1 or cols * s <= dev.num_sms * 9 // 8):
            split = s
    cfg = GemvConfig(min(32, pow2_at_least(N, 16)), block_k, split, num_warps=4,
                     num_stages=3 if layout == "nk" else 4, block_m=row_tile(M))
    return fit_tiling(cfg, gemv_smem, dev.smem_per_block, "block_k", 32)


def load_tile(ref, mask):
    # Unmasked where the tiling divides the weight: Triton refuses `other` without a mask.
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0.0)


def _gemv_kernel(x_ref, w_ref, *rest, M, K, N, cfg: GemvConfig, layout, activation, has_bias, direct):
    b_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    bm, bn, bk, sk = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    i_n, s = pl.program_id(0), pl.program_id(1)
    n0 = i_n * bn
    n_idx = n0 + jnp.arange(bn, dtype=jnp.int32)
    n_ok = n_idx < N
    m_ok = jnp.arange(bm, dtype=jnp.int32) < M
    kb_per_split = cdiv(K, bk) // sk
    k_ragged = K % bk != 0
    n_ragged = N % bn != 0

    def body(kb, acc):
        k0 = (s * kb_per_split + kb) * bk
        k_ok = (k0 + jnp.arange(bk, dtype=jnp.int32)) < K
        x_mask = m_ok[:, None] & k_ok[None, :] if k_ragged else jnp.broadcast_to(m_ok[:, None], (bm, bk))
        xt = plgpu.load(x_ref.at[pl.ds(0, bm), pl.ds(k0, bk)], mask=x_mask, other=0.0)
        if layout == "nk":
            w_mask = None
            if k_ragged or n_ragged:
                w_mask = jnp.broadcast_to(n_ok[:, None] & k_ok[None, :], (bn, bk))
            wt = load_tile(w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], w_mask)
            return acc + plgpu.dot(xt, wt, trans_b=True)
        w_mask = None
        if k_ragged or n_ragged:
            w_mask = jnp.broadcast_to(k_ok[:, None] & n_ok[None, :], (bk, bn))
        wt = load_tile(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], w_mask)
        return acc + plgpu.dot(xt, wt)

    acc = jax.lax.fori_loop(0, kb_per_split, body, jnp.zeros((bm, bn), jnp.float32))
    store_mask = m_ok[:, None] & n_ok[None, :]
    if direct:
        if has_bias:
            acc = acc + plgpu.load(b_ref.at[pl.ds(n0, bn)], mask=n_ok, other=0.0).astype(jnp.float32)[None, :]
        y = get_activation(activation)(acc)
        plgpu.store(o_ref.at[pl.ds(0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=store_mask)
    else:
        plgpu.store(o_ref.at[s, pl.ds(0, bm), pl.ds(n0, bn)], acc, mask=store_mask)


@functools.partial(jax.jit, static_argnames=("activation", "layout", "cfg", "interpret", "defer", "out_dtype", "name"))
def gemv_triton(x, w, bias, *, activation, layout: str, cfg: GemvConfig, interpret: bool, defer: bool = False,
                out_dtype=None, name: str | None = None):
    """`defer`: return a `SplitSum` (the partials and the bias, no epilogue; activation None). `out_dtype`: the
    dtype an unsplit kernel writes (default x's). `name`: the kernel's name in profiles (default gemv_<layout>)."""
    M, K = x.shape
    N = w.shape[1] if layout == "kn" else w.shape[0]
    has_bias = bias is not None
    direct = cfg.split_k == 1
    out_shape = (jax.ShapeDtypeStruct((M, N), out_dtype or x.dtype) if direct
                 else jax.ShapeDtypeStruct((cfg.split_k, M, N), jnp.float32))
    kernel = functools.partial(_gemv_kernel, M=M, K=K, N=N, cfg=cfg, layout=layout, activation=activation,
                               has_bias=has_bias, direct=direct)
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(cdiv(N, cfg.block_n), cfg.split_k), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name=name or f"gemv_{layout}",
    )(x, w, *([bias] if has_bias else []))
    if direct:
        return SplitSum.finished(out) if defer else out
    if defer:
        return SplitSum.of_partials(out, bias, M, N, x.dtype)
    # Split-K epilogue, one fused XLA kernel: sum of the f32 partials, bias, activation, cast.
    y = jnp.sum(out, axis=0)
    if has_bias:
        y = y + bias.astype(jnp.float32)[None, :]
    return get_activation(activation)(y).astype(x.dtype)


def gemv_f32(x, w, layout: str = "nk", config: GemvConfig | None = None, name: str | None = None):
    """x @ W in float32 (no rounding to x's dtype): the sum of the split-K partials (backend entry point)."""
    check_kernel_dtype(x.dtype, use_interpret())
    M, K = x.shape
    N = w.shape[1] if layout == "kn" else w.shape[0]
    cfg = config or choose_f32_config(M, K, N, layout)
    check_tile(cfg, M)
    if cfg.split_k < 1 or cdiv(K, cfg.block_k) % cfg.split_k:
        raise ValueError(f"split_k={cfg.split_k} must divide the {cdiv(K, cfg.block_k)} k-blocks")
    return gemv_f32_triton(x, w, layout=layout, cfg=cfg, interpret=use_interpret(), name=name)


@functools.partial(jax.jit, static_argnames=("layout", "cfg", "interpret", "name"))
def gemv_f32_triton(x, w, *, layout: str, cfg: GemvConfig, interpret: bool, name: str | None = None):
    """The kernel's float32 partials summed by XLA (or, unsplit, its float32 output): never rounded. `name`: as
    gemv_triton's."""
    out = gemv_triton(x, w, None, activation=None, layout=layout, cfg=cfg, interpret=interpret, defer=True,
                      out_dtype=jnp.float32, name=name)
    return jnp.sum(out.parts, axis=0)


def gemv(x, w, bias=None, activation=None, layout: str = "kn", config: GemvConfig | None = None,
         defer: bool = False, name: str | None = None):
    """Backend entry point (the public op in gemv.py validates first); `defer`, `name`: see gemv_triton."""
    check_kernel_dtype(x.dtype, use_interpret())
    M, K = x.shape
    N = w.shape[1] if layout == "kn" else w.shape[0]
    cfg = config or choose_gemv_config(M, K, N, layout)
    check_tile(cfg, M)
    if cfg.split_k < 1 or (K + cfg.block_k - 1) // cfg.block_k % cfg.split_k:
        raise ValueError(f"split_k={cfg.split_k} must divide the {cdiv(K, cfg.block_k)} k-blocks")
    return gemv_triton(x, w, bias, activation=activation, layout=layout, cfg=cfg, interpret=use_interpret(),
                       defer=defer, name=name)
