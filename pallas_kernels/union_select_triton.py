"""Pallas (Triton backend) fused MLP router selection: logits, threshold union, stream compaction.

Two small kernels, no sort:
1. `union_mask`: one program per block of `block_n` neurons computes the logits of every row for its
   neurons (u [B, r] @ w[:, block] in f32, r streamed in `block_r` steps, rows in tiles of at most 64;
   w rank-major [r, N], or neuron-major [N, r] where each neuron's rank vector is one contiguous run),
   takes the maximum over live rows, compares it with the threshold, and writes the block's keep flags
   and their count. The w read (r x N) is the whole cost; the [B, N] logits never reach memory.
2. `union_compact`: one program per block sums the counts of the blocks before it (its output offset)
   and scatters its kept neuron ids to offset + running count (a cumulative sum over the block), so the
   indices come out ascending. It also writes the zeros of the unused slots of its slot range, so every
   slot of the output is written exactly once.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .backends import use_interpret
from .devices import DeviceClass, current_device_class
from .grid import cdiv, pow2_at_least
from .smem import fit_tiling, staged_bytes
from .validation import check_kernel_dtype


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    block_n: int = 64
    block_r: int = 128
    block_b: int = 64  # rows per tile (rows beyond it are looped over)
    num_warps: int = 4
    num_stages: int = 3


def mask_smem(cfg: SelectConfig) -> int:
    """Shared memory of union_mask: per rank step a u tile [block_b, block_r] and a w tile
    [block_r, block_n], `num_stages` deep."""
    return staged_bytes(cfg.num_stages, cfg.block_r * (cfg.block_b + cfg.block_n))


def compact_smem(cfg: SelectConfig) -> int:
    """Bound for union_compact (one stage, no dot): its [block_n, block_n] int32 compare tile."""
    return cfg.block_n * cfg.block_n * 4


def choose_select_config(B: int, r: int, N: int, device: DeviceClass | None = None) -> SelectConfig:
    """Tiles for the router rank r and batch B; `device` (default: this host's class) bounds the
    shared memory (fewer stages, then a narrower rank step, where it would not fit)."""
    del N
    dev = device or current_device_class()
    cfg = SelectConfig(block_r=min(128, pow2_at_least(r, 16)), block_b=min(64, pow2_at_least(B, 16)))
    return fit_tiling(cfg, mask_smem, dev.smem_per_block, "block_r", 16)


def mask_program(i, u_ref, w_ref, live_ref, t_ref, keep_ref, cnt_ref, *, B, R, N, u_offset, w_layout,
                 cfg: SelectConfig):
    """Program i (a block of `block_n` neurons) of union_mask; `i` is an argument so that a kernel sharing
    the launch with other work (`attention_union_triton`) can map its own program ids onto it."""
    bn, br, bb = cfg.block_n, cfg.block_r, cfg.block_b
    cols = i * bn + jnp.arange(bn, dtype=jnp.int32)
    c_ok = cols < N
    t = t_ref[0]

    def row_tile(rt, best):
        rows = rt * bb + jnp.arange(bb, dtype=jnp.int32)
        r_ok = rows < B
        live = plgpu.load(live_ref.at[rows], mask=r_ok, other=0) != 0

        def r_step(j, acc):
            ks = j * br + jnp.arange(br, dtype=jnp.int32)
            k_ok = ks < R
            ut = plgpu.load(u_ref.at[rows[:, None], u_offset + ks[None, :]],
                            mask=jnp.broadcast_to(r_ok[:, None] & k_ok[None, :], (bb, br)), other=0.0)
            if w_layout == "nr":  # [bn, br]: each neuron's rank vector is one contiguous run
                wt = plgpu.load(w_ref.at[cols[:, None], ks[None, :]],
                                mask=jnp.broadcast_to(c_ok[:, None] & k_ok[None, :], (bn, br)), other=0.0)
                return acc + plgpu.dot(ut.astype(wt.dtype), wt, trans_b=True)
            wt = plgpu.load(w_ref.at[ks[:, None], cols[None, :]],
                            mask=jnp.broadcast_to(k_ok[:, None] & c_ok[None, :], (br, bn)), other=0.0)
            return acc + plgpu.dot(ut.astype(wt.dtype), wt)  # a float32 u is rounded to w's dtype here

        acc = jax.lax.fori_loop(0, cdiv(R, br), r_step, jnp.zeros((bb, bn), jnp.float32))
        acc = jnp.where(live[:, None], acc, -jnp.inf)
        return jnp.maximum(best, jnp.max(acc, axis=0))

    best = jax.lax.fori_loop(0, cdiv(B, bb), row_tile, jnp.full((bn,), -jnp.inf, jnp.float32))
    keep = ((best > t) & c_ok).astype(jnp.int32)
    keep_ref[pl.ds(i * bn, bn)] = keep
    cnt_ref[i] = jnp.sum(keep)


def _mask_kernel(*refs, **shape):
    mask_program(pl.program_id(0), *refs, **shape)


def compact_program(i, keep_ref, cnt_ref, idx_ref, total_ref, *, N, cap, n_blocks, clamp, cfg: SelectConfig):
    """Program i (the same neuron block as union_mask's program i) of union_compact."""
    bn = cfg.block_n
    nb = pow2_at_least(n_blocks)
    blocks = jnp.arange(nb, dtype=jnp.int32)
    counts = plgpu.load(cnt_ref.at[blocks], mask=blocks < n_blocks, other=0)
    offset = jnp.sum(jnp.where(blocks < i, counts, 0))
    total = jnp.sum(counts)
    keep = keep_ref[pl.ds(i * bn, bn)]
    lanes = jnp.arange(bn, dtype=jnp.int32)
    rank = jnp.cumsum(keep) - 1  # output lane of each kept neuron within the block
    # Compress within the block ([bn, bn] compares in registers), then one contiguous store at the
    # block's offset: no scattered addresses, and the blocks' ranges do not overlap.
    hit = (rank[None, :] == lanes[:, None]) & (keep[None, :] != 0)
    packed = jnp.sum(jnp.where(hit, i * bn + lanes[None, :], 0), axis=1)
    n_here = jnp.sum(keep)
    put = (lanes < n_here) & (offset + lanes < cap)
    plgpu.store(idx_ref.at[pl.ds(offset, bn)], packed, mask=put)
    # unused slots of this program's slot range [i*bn, (i+1)*bn) hold 0
    slots = i * bn + lanes
    plgpu.store(idx_ref.at[pl.ds(i * bn, bn)], jnp.zeros((bn,), jnp.int32),
                mask=(slots >= total) & (slots < cap))

    @pl.when(i == 0)
    def _total():
        total_ref[0] = jnp.minimum(total, cap) if clamp else total


def _compact_kernel(*refs, **shape):
    compact_program(pl.program_id(0), *refs, **shape)


@functools.partial(jax.jit, static_argnames=("capacity", "cfg", "interpret", "u_offset", "clamp", "w_layout"))
def union_select_triton(u, w, live, threshold, *, capacity: int, cfg: SelectConfig, interpret: bool,
                        u_offset: int = 0, clamp: bool = False, w_layout: str = "rn"):
    B = u.shape[0]
    R, N = w.shape if w_layout == "rn" else w.shape[::-1]
    n_blocks = cdiv(N, cfg.block_n)
    if n_blocks * cfg.block_n < capacity:
        raise ValueError("capacity larger than the padded neuron count")
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    keep, counts = pl.pallas_call(
        functools.partial(_mask_kernel, B=B, R=R, N=N, u_offset=u_offset, w_layout=w_layout, cfg=cfg),
        out_shape=(jax.ShapeDtypeStruct((n_blocks * cfg.block_n,), jnp.int32),
                   jax.ShapeDtypeStruct((n_blocks,), jnp.int32)),
        grid=(n_blocks,), interpret=interpret, compiler_params=params, name="union_mask",
    )(u, w, live.astype(jnp.int32), jnp.reshape(threshold.astype(jnp.float32), (1,)))
    idx, total = pl.pallas_call(
        functools.partial(_compact_kernel, N=N, cap=capacity, n_blocks=n_blocks, clamp=clamp, cfg=cfg),
        out_shape=(jax.ShapeDtypeStruct((capacity,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)),
        grid=(n_blocks,), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), name="union_compact",
    )(keep, counts)
    return idx, total[0]


def union_select(u, w, live, threshold, capacity: int, u_offset: int = 0, clamp: bool = False,
                 w_layout: str = "rn", config: SelectConfig | None = None):
    """Backend entry point (validated by union_select.union_select); `config` for benchmarks."""
    check_kernel_dtype(w.dtype, use_interpret())
    R, N = w.shape if w_layout == "rn" else w.shape[::-1]
    cfg = config or choose_select_config(u.shape[0], R, N)
    return union_select_triton(u, w, live, threshold, capacity=capacity, cfg=cfg, interpret=use_interpret(),
                               u_offset=u_offset, clamp=clamp, w_layout=w_layout)
