"""Pallas (Triton backend) selective GEMMs: gathered up/gate projection and gathered down projection.

Both kernels are memory bound for decode-sized M: the cost is the active weight rows, so each
program streams contiguous weight rows (`w[idx[j], k0:k0+bk]`, neuron-major layout) with wide
loads, and small M is compensated by splitting the reduction (K for the up projection, the active
neurons for the down projection) over more programs, with float32 partials summed by a fused
XLA epilogue. Grids are static (sized for the slot capacity A); the live count `n_active` is read
inside the kernel, so one compiled kernel serves every density.
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
from .devices import REFERENCE, DeviceClass, current_device_class
from .grid import cdiv, pow2_at_least
from .smem import fit_tiling, staged_bytes
from .split_sum import SplitSum
from .validation import check_kernel_dtype


@dataclasses.dataclass(frozen=True)
class UpConfig:
    block_m: int
    block_a: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class DownConfig:
    block_m: int
    block_j: int
    block_d: int
    split_j: int
    num_warps: int
    num_stages: int
    # Splits add their f32 tiles into one zero-initialised [M, D] buffer with atomics instead of
    # writing [split_j, M, D] partials for an XLA sum: less traffic when split_j is large, but
    # the summation order (so the last bits) then varies from run to run.
    atomic: bool = False


def up_smem(cfg: UpConfig, gated: bool = False) -> int:
    """Shared memory of gather_up: per k-step an x tile [block_m, block_k] and one weight tile
    [block_a, block_k] (two when gated), `num_stages` deep."""
    return staged_bytes(cfg.num_stages, (cfg.block_m + cfg.block_a * (2 if gated else 1)) * cfg.block_k)


def down_smem(cfg: DownConfig) -> int:
    """Shared memory of gather_down: per neuron chunk an h tile [block_m, block_j] and a weight tile
    [block_j, block_d], `num_stages` deep."""
    return staged_bytes(cfg.num_stages, cfg.block_j * (cfg.block_m + cfg.block_d))


def _largest_divisor_at_most(n: int, cap: int) -> int:
    best = 1
    for d in range(1, n + 1):
        if n % d == 0 and d <= cap:
            best = d
    return best


def up_split(M: int, K: int, A: int, block_m: int, block_a: int, block_k: int,
             gated: bool = False, num_sms: int = REFERENCE.num_sms) -> int:
    """K splits for gather_up. No split once there are enough (m, a) blocks to cover the SMs
    about once (gated blocks count twice: two weight tiles per step): the f32 partials and
    their epilogue kernel cost more than the idle SMs (H100, 2026-11-21 tuning: M=64 d=4096 50%
    33.2 -> 27.5 us, SwiGLU M=64 25% 27.7 -> 21.3 us). Below that, split into whole k-blocks
    until two waves of programs keep enough loads in flight for HBM (M=64 10%: 10.5 us with 4
    splits vs 12.5 us without)."""
    n_kb = cdiv(K, block_k)
    n_blocks = cdiv(M, block_m) * cdiv(A, block_a)
    if n_blocks * (2 if gated else 1) >= num_sms * 7 // 8:
        return 1
    want = cdiv(2 * num_sms, n_blocks)
    return _largest_divisor_at_most(n_kb, max(1, min(want, n_kb // 2 if n_kb >= 4 else 1)))


def choose_up_config(M: int, K: int, A: int, gated: bool = False,
                     device: DeviceClass | None = None) -> UpConfig:
    """Static tiling for gather_up from the shapes (A is the slot capacity).

    Tuned on the H100 (benchmarks/kernels/NOTES.md): for M <= 64, 32 active rows x 128-wide
    k-steps (6 pipeline stages for M <= 16, 4 for M = 64, where 64-row x tiles fill shared memory
    sooner); for M=256 64x64 tiles with 256-wide steps. At 16 < M <= 64, once 32-row blocks
    would take more than one wave (two programs per SM), 64 rows x 64-wide k-steps with 6
    stages: half the re-reads of x per weight byte and half the programs (relu d=9216 M=64
    25%: 66.0 vs 81.0 us, 2026-11-21). Not at M = 32: on the H200 (2026-11-28, d=4096, 6144 of 9216
    slots live) 32 x 128 tiles with 4 stages ran 18.6 us against 22.0 us for 64 x 64.

    `device` (default: this host's class): on GPUs with less shared memory than Hopper the same
    tiles get fewer pipeline stages, then narrower k-steps (smem.fit_tiling); the SM count sizes
    the split. Untuned there: the rule keeps the H100's tile shapes wherever they fit."""
    dev = device or current_device_class()
    block_m = min(pow2_at_least(M, 16), 64)
    block_a = 64 if M > 64 else 32
    if gated:
        block_a = min(block_a, 32)
    wide = M > 64
    block_k = 256 if wide and K > 128 else 128
    num_stages = 3 if wide else (6 if M <= 16 else 4)
    if 32 < M <= 64 and not gated and cdiv(A, block_a) > 2 * dev.num_sms:
        block_a, block_k, num_stages = 64, 64, 6
    cfg = UpConfig(block_m, block_a, block_k, 1, num_warps=4, num_stages=num_stages)
    cfg = fit_tiling(cfg, lambda c: up_smem(c, gated), dev.smem_per_block, "block_k", 32)
    split_k = up_split(M, K, A, block_m, cfg.block_a, cfg.block_k, gated, dev.num_sms)
    return dataclasses.replace(cfg, split_k=split_k)


def down_split(M: int, D: int, A: int, block_m: int, block_j: int, block_d: int,
               num_sms: int = REFERENCE.num_sms) -> int:
    """Splits of the active neurons for gather_down: about 4 programs per SM for M <= 16, never
    more than there are neuron chunks. For 16 < M <= 64 the 8-warp 128 x 128 tiles fit two
    programs per SM (Nsight Compute on the H100, 2026-11-21), so the split is rounded *down* to
    keep every program in one wave (d=9216 M=64 25%: 3 splits 77.2 us vs 4 splits, 1.09 waves,
    97.7 us; at d=4096, 8 vs 9 splits, within 1%)."""
    n_blocks = cdiv(M, block_m) * cdiv(D, block_d)
    if 16 < M <= 64:
        want = max(1, (2 * num_sms) // n_blocks)
    else:
        want = cdiv((4 if M <= 16 else 2) * num_sms, n_blocks)
    return max(1, min(want, cdiv(A, block_j)))


def choose_down_config(M: int, D: int, A: int, device: DeviceClass | None = None) -> DownConfig:
    """Static tiling for gather_down from the shapes (A is the slot capacity).

    Tuned on the H100 (2026-11-21): for M <= 16, 128 active neurons x 64 output columns per
    step with 4 stages (M=16 d=4096 25%: 17.7 vs 18.1 us for 64 x 128); for M in (16, 64],
    128 x 128 with 8 warps (M=64 d=4096 50%: 37.1 vs 39.3 us); M=256 keeps 64 x 128.
    Atomic accumulation instead of partials measured 1.1-2x slower everywhere. `device`: as for
    choose_up_config (fewer stages, then narrower neuron chunks, where Hopper's tiles do not fit)."""
    dev = device or current_device_class()
    block_m = min(pow2_at_least(M, 16), 64)
    if M <= 16:
        block_j, block_d, warps, stages = 128, 64, 4, 4
    elif M <= 64:
        block_j, block_d, warps, stages = 128, 128, 8, 3
    else:
        block_j, block_d, warps, stages = 64, 128, 4, 3
    block_d = min(block_d, pow2_at_least(D, 16))
    cfg = DownConfig(block_m, block_j, block_d, 1, num_warps=warps, num_stages=stages)
    cfg = fit_tiling(cfg, down_smem, dev.smem_per_block, "block_j", 32)
    split_j = down_split(M, D, A, block_m, cfg.block_j, block_d, dev.num_sms)
    return dataclasses.replace(cfg, split_j=split_j)


# --------------------------------------------------------------------------------------------
# gather_up (plain and gated)
# --------------------------------------------------------------------------------------------
def _up_kernel(*refs, M, K, N, A, cfg: UpConfig, activation, gated, has_bias, direct):
    if gated:
        x_ref, wg_ref, wu_ref, idx_ref, n_ref, *rest = refs
    else:
        x_ref, wg_ref, idx_ref, n_ref, *rest = refs
        wu_ref = None
    b_ref = rest.pop(0) if has_bias else None
    o_refs = rest  # one output, or (gate, up) f32 partials in the gated split-K form
    o_ref = o_refs[0]
    bm, ba, bk, sk = cfg.block_m, cfg.block_a, cfg.block_k, cfg.split_k
    im, ia, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = n_ref[0]
    a0 = ia * ba
    m0 = im * bm
    slots = a0 + jnp.arange(ba, dtype=jnp.int32)
    m_idx = m0 + jnp.arange(bm, dtype=jnp.int32)
    m_ok = m_idx < M
    kb_per_split = cdiv(K, bk) // sk
    k_ragged = K % bk != 0

    @pl.when(a0 < n)
    def _compute():
        live = slots < n
        rows = plgpu.load(idx_ref.at[pl.ds(a0, ba)], mask=slots < A, other=0)
        rows = jnp.clip(rows, 0, N - 1)

        def body(kb, accs):
            k0 = (s * kb_per_split + kb) * bk
            cols = k0 + jnp.arange(bk, dtype=jnp.int32)
            x_mask = m_ok[:, None]
            w_mask = live[:, None]
            if k_ragged:
                x_mask = x_mask & (cols < K)[None, :]
                w_mask = w_mask & (cols < K)[None, :]
            x_mask = jnp.broadcast_to(x_mask, (bm, bk))
            w_mask = jnp.broadcast_to(w_mask, (ba, bk))
            xt = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mask=x_mask, other=0.0)
            wt = plgpu.load(wg_ref.at[rows[:, None], cols[None, :]], mask=w_mask, other=0.0)
            out = [accs[0] + plgpu.dot(xt, wt, trans_b=True)]
            if gated:
                wu = plgpu.load(wu_ref.at[rows[:, None], cols[None, :]], mask=w_mask, other=0.0)
                out.append(accs[1] + plgpu.dot(xt, wu, trans_b=True))
            return tuple(out)

        init = tuple(jnp.zeros((bm, ba), jnp.float32) for _ in range(2 if gated else 1))
        accs = jax.lax.fori_loop(0, kb_per_split, body, init)
        store_mask = m_ok[:, None] & (slots < A)[None, :]
        if direct:
            y = accs[0]
            if has_bias:
                bias = plgpu.load(b_ref.at[rows], mask=live, other=0.0).astype(jnp.float32)
                y = y + bias[None, :]
            if gated:
                y = get_activation("silu")(y) * accs[1]
            else:
                y = get_activation(activation)(y)
            y = jnp.where(live[None, :], y, 0.0)
            plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(a0, ba)], y.astype(o_ref.dtype), mask=store_mask)
        else:
            for acc, ref in zip(accs, o_refs):
                plgpu.store(ref.at[s, pl.ds(m0, bm), pl.ds(a0, ba)], acc, mask=store_mask)

    if direct:
        # Whole blocks past n_active: the contract wants exact zeros there.
        @pl.when(a0 >= n)
        def _zeros():
            store_mask = m_ok[:, None] & (slots < A)[None, :]
            plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(a0, ba)],
                        jnp.zeros((bm, ba), o_ref.dtype), mask=store_mask)


@functools.partial(jax.jit, static_argnames=("activation", "cfg", "interpret"))
def gather_up_triton(x, w_gate, w_up, idx, n_active, bias, *, activation, cfg: UpConfig, interpret):
    """Pallas gather_up; `w_up` is None for the plain variant (then `activation` applies)."""
    M, K = x.shape
    N = w_gate.shape[0]
    A = idx.shape[0]
    gated = w_up is not None
    has_bias = bias is not None
    direct = cfg.split_k == 1
    n_arr = jnp.reshape(jnp.asarray(n_active, jnp.int32), (1,))
    grid = (cdiv(M, cfg.block_m), cdiv(A, cfg.block_a), cfg.split_k)
    n_acc = 2 if gated else 1
    if direct:
        out_shape = jax.ShapeDtypeStruct((M, A), x.dtype)
    else:
        out_shape = tuple(jax.ShapeDtypeStruct((cfg.split_k, M, A), jnp.float32)
                          for _ in range(n_acc))
    kernel = functools.partial(_up_kernel, M=M, K=K, N=N, A=A, cfg=cfg, activation=activation,
                               gated=gated, has_bias=has_bias, direct=direct)
    args = [x, w_gate] + ([w_up] if gated else []) + [idx.astype(jnp.int32), n_arr]
    if has_bias:
        args.append(bias)
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="gather_up_gated" if gated else "gather_up",
    )(*args)
    if direct:
        return out
    # Split-K epilogue (one fused XLA kernel): sum the f32 partials, bias, activation, mask.
    live = jnp.arange(A, dtype=jnp.int32) < n_arr[0]
    sel = jnp.clip(idx.astype(jnp.int32), 0, N - 1)
    y = jnp.sum(out[0], axis=0)  # out is a tuple of partials here
    if has_bias:
        y = y + jnp.take(bias, sel).astype(jnp.float32)[None, :]
    if gated:
        y = get_activation("silu")(y) * jnp.sum(out[1], axis=0)
    else:
        y = get_activation(activation)(y)
    return jnp.where(live[None, :], y, 0.0).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# gather_down
# --------------------------------------------------------------------------------------------
def _down_kernel(*refs, M, D, N, A, cfg: DownConfig, has_bias, direct):
    h_ref, w_ref, idx_ref, n_ref, *rest = refs
    b_ref = rest.pop(0) if has_bias else None
    o_ref = rest[-1]  # with atomics the zero-filled input buffer is aliased to the output
    bm, bj, bd, sj = cfg.block_m, cfg.block_j, cfg.block_d, cfg.split_j
    im, idb, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = n_ref[0]
    m0 = im * bm
    d0 = idb * bd
    m_idx = m0 + jnp.arange(bm, dtype=jnp.int32)
    d_idx = d0 + jnp.arange(bd, dtype=jnp.int32)
    m_ok = m_idx < M
    d_ok = d_idx < D
    d_ragged = D % bd != 0
    # The active neurons are cut into chunks of bj; split s takes a contiguous run of chunks,
    # sized from the live count so that every density spreads over all splits.
    n_chunks = (n + bj - 1) // bj
    per_split = (n_chunks + sj - 1) // sj
    c_lo = jnp.minimum(s * per_split, n_chunks)
    c_hi = jnp.minimum(c_lo + per_split, n_chunks)

    def body(c, acc):
        j0 = c * bj
        slots = j0 + jnp.arange(bj, dtype=jnp.int32)
        live = slots < n
        rows = plgpu.load(idx_ref.at[pl.ds(j0, bj)], mask=live, other=0)
        rows = jnp.clip(rows, 0, N - 1)
        h_mask = jnp.broadcast_to(m_ok[:, None] & live[None, :], (bm, bj))
        ht = plgpu.load(h_ref.at[pl.ds(m0, bm), pl.ds(j0, bj)], mask=h_mask, other=0.0)
        w_mask = live[:, None]
        if d_ragged:
            w_mask = w_mask & d_ok[None, :]
        w_mask = jnp.broadcast_to(w_mask, (bj, bd))
        wt = plgpu.load(w_ref.at[rows[:, None], d_idx[None, :]], mask=w_mask, other=0.0)
        return acc + plgpu.dot(ht, wt)

    acc = jax.lax.fori_loop(c_lo, c_hi, body, jnp.zeros((bm, bd), jnp.float32))
    store_mask = m_ok[:, None] & d_ok[None, :]
    if direct:
        if has_bias:
            bias = plgpu.load(b_ref.at[pl.ds(d0, bd)], mask=d_ok, other=0.0).astype(jnp.float32)
            acc = acc + bias[None, :]
        plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(d0, bd)], acc.astype(o_ref.dtype), mask=store_mask)
    elif cfg.atomic:
        # The buffer is padded to whole tiles, so the add needs no mask (interpret mode has no
        # masked atomics); splits with no chunk skip it.
        @pl.when(c_lo < c_hi)
        def _add():
            plgpu.atomic_add(o_ref, (pl.ds(m0, bm), pl.ds(d0, bd)), acc)
    else:
        # Every split writes (zeros when it has no chunk) so the epilogue sum needs no mask.
        plgpu.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(d0, bd)], acc, mask=store_mask)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "defer"))
def gather_down_triton(h, w, idx, n_active, bias, *, cfg: DownConfig, interpret, defer: bool = False):
    """Pallas gather_down: sum_{j<n} h[:, j] w[idx[j]] (+ bias). `defer`: return a `SplitSum` (the
    partials, or the atomics' padded sum, and the bias; no epilogue)."""
    M, A = h.shape
    N, D = w.shape
    has_bias = bias is not None
    direct = cfg.split_j == 1
    atomic = cfg.atomic and not direct
    n_arr = jnp.reshape(jnp.asarray(n_active, jnp.int32), (1,))
    grid = (cdiv(M, cfg.block_m), cdiv(D, cfg.block_d), cfg.split_j)
    args = [h, w, idx.astype(jnp.int32), n_arr] + ([bias] if has_bias else [])
    aliases = {}
    if direct:
        out_shape = jax.ShapeDtypeStruct((M, D), h.dtype)
    elif atomic:
        padded = (grid[0] * cfg.block_m, grid[1] * cfg.block_d)
        out_shape = jax.ShapeDtypeStruct(padded, jnp.float32)
        aliases = {len(args): 0}
        args.append(jnp.zeros(padded, jnp.float32))
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.split_j, M, D), jnp.float32)
    kernel = functools.partial(_down_kernel, M=M, D=D, N=N, A=A, cfg=cfg, has_bias=has_bias,
                               direct=direct)
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="gather_down",
    )(*args)
    if direct:
        return SplitSum.finished(out) if defer else out
    if defer:
        return SplitSum.of_partials(out[None] if atomic else out, bias, M, D, h.dtype)
    y = out[:M, :D] if atomic else jnp.sum(out, axis=0)
    if has_bias:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(h.dtype)


# --------------------------------------------------------------------------------------------
# backend entry points (the public API in selective_gemm.py validates and dispatches here;
# benchmarks pass `config` to try other tilings)
# --------------------------------------------------------------------------------------------
def gather_up(x, w, idx, n_active, bias=None, activation="relu", config: UpConfig | None = None):
    check_kernel_dtype(x.dtype, use_interpret())
    M, K = x.shape
    cfg = config or choose_up_config(M, K, idx.shape[0])
    return gather_up_triton(x, w, None, idx, n_active, bias, activation=activation, cfg=cfg,
                            interpret=use_interpret())


def gather_up_gated(x, w_gate, w_up, idx, n_active, config: UpConfig | None = None):
    check_kernel_dtype(x.dtype, use_interpret())
    M, K = x.shape
    cfg = config or choose_up_config(M, K, idx.shape[0], gated=True)
    return gather_up_triton(x, w_gate, w_up, idx, n_active, None, activation=None, cfg=cfg,
                            interpret=use_interpret())


def gather_down(h, w, idx, n_active, bias=None, config: DownConfig | None = None, defer: bool = False):
    check_kernel_dtype(h.dtype, use_interpret())
    cfg = config or choose_down_config(h.shape[0], w.shape[1], idx.shape[0])
    return gather_down_triton(h, w, idx, n_active, bias, cfg=cfg, interpret=use_interpret(), defer=defer)
