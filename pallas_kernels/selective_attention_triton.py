"""Pallas (Triton backend) head/group-selective flash decoding over the native KV-cache layout.

One program per (sequence b, active group slot j, KV split). The program loads [block_s, D] tiles
of its group's keys and values straight from the [B, S, Hkv, D] cache (rows of D contiguous
elements, stride Hkv*D between keys: no transpose, no copy) and uses each tile for all Hq/Hkv
query heads of the group at once (query rows padded to 16 for tl.dot and masked), so every
selected group's KV is read exactly once. Softmax is online in float32 (base-2 exponentials).

The grid is static: (B, A slots, max splits). Each program derives its key range from the live
length of its sequence (and the sliding window), so splits follow the live lengths; programs
whose slot is past n_active[b], or whose range is empty, exit at once. When the run-time split
count is 1 a program writes its heads' output directly; otherwise it writes a partial
(normalised f32 output and log2-sum-exp). A second small kernel, one program per (sequence, KV
group, head-dim block), merges the partials and writes zeros for unselected groups, in place on
the output.
It replaced an XLA epilogue of six small kernels that cost 8.6-13.5 us per call at 268 MB of
active KV on the H100 (benchmarks/kernels/NOTES.md), about 10% of the call.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .backends import use_interpret
from .devices import REFERENCE, DeviceClass, current_device_class
from .grid import cdiv, pow2_at_least
from .smem import fit_tiling, staged_bytes
from .validation import check_kernel_dtype

PROGRAMS_PER_SM = 8  # live programs wanted per call (several per SM for balance)
TARGET_PROGRAMS = PROGRAMS_PER_SM * REFERENCE.num_sms
LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    block_s: int
    num_splits: int
    min_chunk: int
    num_warps: int
    num_stages: int
    target_programs: int = TARGET_PROGRAMS  # live programs the run-time split count aims for


def attn_smem(cfg: AttnConfig, G: int, D: int) -> int:
    """Shared memory of the split decode kernel: per key block a K and a V tile [block_s, D] (D padded
    to a power of two), `num_stages` deep, and the group's query rows [G padded to 16, D] once."""
    dp = pow2_at_least(D, 16)
    return staged_bytes(cfg.num_stages, 2 * cfg.block_s * dp, pow2_at_least(G, 16) * dp)


def finish_smem(num_splits: int, G: int, D: int) -> int:
    """Bound for the finish kernel (one stage, no dot): its [splits, G, columns] f32 tile, the most
    its reductions over the splits can stage."""
    return pow2_at_least(num_splits) * pow2_at_least(G) * finish_block_d(num_splits, G, D) * 4


def choose_attn_config(B: int, S: int, A: int, D: int, G: int = 1,
                       device: DeviceClass | None = None) -> AttnConfig:
    """Static bounds of the grid: `num_splits` is the most KV splits any (sequence, slot) may use.

    It is sized for the sparsest case (one live slot per sequence) and capped by the cache
    capacity; the kernel picks the split count it actually uses at run time from the live slot
    count (sum of n_active) and the live lengths, and programs beyond it exit at once.
    `device` (default: this host's class) sizes the run-time target by its SM count; where 64-key
    blocks of a large head dim do not fit its shared memory, the key block is halved (G: query
    heads per KV group)."""
    del A
    dev = device or current_device_class()
    # One sequence (B=1 decode) has few (slot, split) programs: 128-key chunks give it twice the splits
    # (OPT-6.7B B=1 step 1.1-1.7 % faster on the H200, LLaMA-2-7B within 0.5 %;
    # benchmarks/results/raw_2026-11-29b_h200/call3_step_variants_b1.json, variant chunk128)
    min_chunk = 128 if B == 1 else 256
    target = PROGRAMS_PER_SM * dev.num_sms
    max_splits = max(1, cdiv(S, min_chunk))
    num_splits = max(1, min(max_splits, 64, cdiv(target, max(1, B))))
    cfg = AttnConfig(block_s=64, num_splits=num_splits, min_chunk=min_chunk, num_warps=4, num_stages=2,
                     target_programs=target)
    return fit_tiling(cfg, lambda c: attn_smem(c, G, D), dev.smem_per_block, "block_s", 16)


def runtime_splits(total_active, num_splits: int, target: int = TARGET_PROGRAMS):
    """Splits used at run time: enough (sequence, slot, split) programs to fill the GPU.

    Rounded up, except that live slots within 10% of the target take one split: one split
    writes the output directly, with no partials to merge (GQA B=256 L=512 at half the groups,
    1024 slots: 100.2 us with one split vs 105.8 us with two, H100 2026-11-21)."""
    total = jnp.maximum(total_active, 1)
    want = (10 * target + 9 * total - 1) // (10 * total)  # ceil(target / total - 0.1)
    return jnp.clip(want, 1, num_splits)


def _split_range(L, splits, block_s: int, min_chunk: int, window: int | None, sp):
    """Key range [lo, hi) of split `sp` out of `splits` for live length L (traced scalars)."""
    start = jnp.maximum(L - window, 0) if window is not None else jnp.int32(0)
    live = L - start
    chunk = (live + splits - 1) // splits
    chunk = jnp.maximum(chunk, min_chunk)
    chunk = ((chunk + block_s - 1) // block_s) * block_s
    lo = start + sp * chunk
    hi = jnp.minimum(lo + chunk, L)
    hi = jnp.where(sp < splits, hi, lo)  # splits past the run-time count are empty
    return lo, hi


def _live_splits(len_ref, nact_ref, b, *, S: int, B: int, A: int, cfg: AttnConfig):
    """(live length of sequence b, split count used at run time): both kernels derive them
    the same way from the live slot count, so they agree without passing anything."""
    L = jnp.clip(len_ref[b], 0, S)
    bp = pow2_at_least(B)
    b_all = jnp.arange(bp, dtype=jnp.int32)
    n_all = plgpu.load(nact_ref.at[pl.ds(0, bp)], mask=b_all < B, other=0)
    total = jnp.sum(jnp.clip(n_all, 0, A))
    return L, runtime_splits(total, cfg.num_splits, cfg.target_programs)


def attn_program(b, j, sp, q_ref, k_ref, v_ref, len_ref, grp_ref, nact_ref, o_ref, lse_ref, out_ref, *,
                 S, Hkv, G, D, A, B, cfg: AttnConfig, window, scale_log2):
    """The work of program (sequence b, slot j, split sp) of the split decode kernel. Its coordinates are
    arguments so that a kernel sharing the launch with other work (`attention_union_triton`) can map its
    own program ids onto them."""
    bs = cfg.block_s
    gp = pow2_at_least(G, 16)
    dp = pow2_at_least(D, 16)
    n = nact_ref[b]
    L, splits = _live_splits(len_ref, nact_ref, b, S=S, B=B, A=A, cfg=cfg)
    lo, hi = _split_range(L, splits, bs, cfg.min_chunk, window, sp)
    rows = jnp.arange(gp, dtype=jnp.int32)
    r_ok = rows < G

    @pl.when((j < n) & (lo < hi))
    def _compute():
        g = jnp.clip(grp_ref[b, j], 0, Hkv - 1)
        dcols = jnp.arange(dp, dtype=jnp.int32)
        d_ok = dcols < D
        q_mask = jnp.broadcast_to(r_ok[:, None] & d_ok[None, :], (gp, dp))
        q = plgpu.load(q_ref.at[b, pl.ds(g * G, gp), pl.ds(0, dp)], mask=q_mask, other=0.0)

        def body(t, carry):
            m_i, l_i, acc = carry
            s0 = lo + t * bs
            keys = s0 + jnp.arange(bs, dtype=jnp.int32)
            k_ok = keys < hi
            kv_mask = k_ok[:, None]
            if dp != D:
                kv_mask = kv_mask & d_ok[None, :]
            kv_mask = jnp.broadcast_to(kv_mask, (bs, dp))
            kt = plgpu.load(k_ref.at[b, pl.ds(s0, bs), g, pl.ds(0, dp)], mask=kv_mask, other=0.0)
            sc = plgpu.dot(q, kt, trans_b=True) * scale_log2  # [gp, bs] f32, log2 domain
            sc = jnp.where(k_ok[None, :], sc, -jnp.inf)
            m_new = jnp.maximum(m_i, jnp.max(sc, axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(sc - m_new[:, None])
            l_new = l_i * alpha + jnp.sum(p, axis=1)
            vt = plgpu.load(v_ref.at[b, pl.ds(s0, bs), g, pl.ds(0, dp)], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + plgpu.dot(p.astype(vt.dtype), vt)
            return m_new, l_new, acc

        n_blocks = (hi - lo + bs - 1) // bs
        init = (jnp.full((gp,), -jnp.inf, jnp.float32), jnp.zeros((gp,), jnp.float32),
                jnp.zeros((gp, dp), jnp.float32))
        m_i, l_i, acc = jax.lax.fori_loop(0, n_blocks, body, init)
        out = acc / l_i[:, None]
        o_mask = r_ok[:, None]
        if dp != D:
            o_mask = o_mask & d_ok[None, :]
        o_mask = jnp.broadcast_to(o_mask, (gp, dp))

        @pl.when(splits == 1)
        def _final():
            # The whole range in one program: write the heads' output directly (no partials;
            # a group listed twice writes the same values twice).
            plgpu.store(out_ref.at[b, g, pl.ds(0, gp), pl.ds(0, dp)], out.astype(out_ref.dtype),
                        mask=o_mask)

        @pl.when(splits > 1)
        def _partial():
            plgpu.store(o_ref.at[b, j, sp, pl.ds(0, gp), pl.ds(0, dp)], out, mask=o_mask)
            plgpu.store(lse_ref.at[b, j, sp, pl.ds(0, gp)], m_i + jnp.log2(l_i), mask=r_ok)


def _attn_kernel(*refs, **shape):
    attn_program(pl.program_id(0), pl.program_id(1), pl.program_id(2), *refs, **shape)


def finish_block_d(num_splits: int, G: int, D: int) -> int:
    """Head-dim columns per finish program: all live partials of a group are loaded at once as
    one [splits, G, columns] tile (every load in flight together; a loop over the splits ran
    7.9 us for 17 splits at B=16), kept to about 4096 values so the tile stays in registers."""
    nsp, gp, dp = pow2_at_least(num_splits), pow2_at_least(G), pow2_at_least(D)
    return max(min(dp, 16), min(dp, pow2_at_least(max(1, 4096 // (nsp * gp)))))


def finish_program(b, g, c, o_ref, lse_ref, len_ref, grp_ref, nact_ref, _out_in, out_ref, *, S, Hkv, G, D,
                   A, B, cfg: AttnConfig, window, block_d):
    """Program (sequence b, KV group g, column block c) of the finish kernel: zeros for a group that is not
    selected (or has no live key), the merge of its first slot's split partials when the range
    was split, nothing when the main kernel already wrote it. Every output element is written
    exactly once."""
    gp = pow2_at_least(G)
    ap = pow2_at_least(A)
    nsp = pow2_at_least(cfg.num_splits)
    n = nact_ref[b]
    L, splits = _live_splits(len_ref, nact_ref, b, S=S, B=B, A=A, cfg=cfg)
    slots = jnp.arange(ap, dtype=jnp.int32)
    grp = plgpu.load(grp_ref.at[b, pl.ds(0, ap)], mask=slots < A, other=-1)
    # first slot holding g; slots >= A load as -1, so a match is always a real slot (< A)
    j = jnp.min(jnp.where((grp == g) & (slots < n), slots, ap))
    start = jnp.maximum(L - window, 0) if window is not None else jnp.int32(0)
    computed = (j < ap) & (L > start)
    d0 = c * block_d
    rows = jnp.arange(gp, dtype=jnp.int32)
    dcols = d0 + jnp.arange(block_d, dtype=jnp.int32)
    r_ok = rows < G
    d_ok = dcols < D
    o_mask = jnp.broadcast_to(r_ok[:, None] & d_ok[None, :], (gp, block_d))
    dst = out_ref.at[b, g, pl.ds(0, gp), pl.ds(d0, block_d)]

    @pl.when(jnp.logical_not(computed))
    def _zeros():
        plgpu.store(dst, jnp.zeros((gp, block_d), out_ref.dtype), mask=o_mask)

    @pl.when(computed & (splits > 1))
    def _merge():
        sp = jnp.arange(nsp, dtype=jnp.int32)
        lo, hi = _split_range(L, splits, cfg.block_s, cfg.min_chunk, window, sp)
        live = (sp < cfg.num_splits) & (lo < hi)
        lse_mask = jnp.broadcast_to(live[:, None] & r_ok[None, :], (nsp, gp))
        lse = plgpu.load(lse_ref.at[b, j, pl.ds(0, nsp), pl.ds(0, gp)], mask=lse_mask,
                         other=-jnp.inf)
        mx = jnp.max(lse, axis=0)
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)  # padded rows only
        w = jnp.where(lse_mask, jnp.exp2(lse - mx[None, :]), 0.0)  # [splits, G]
        p_mask = jnp.broadcast_to(lse_mask[:, :, None] & d_ok[None, None, :], (nsp, gp, block_d))
        parts = plgpu.load(o_ref.at[b, j, pl.ds(0, nsp), pl.ds(0, gp), pl.ds(d0, block_d)],
                           mask=p_mask, other=0.0)
        num = jnp.sum(w[:, :, None] * parts, axis=0)
        den = jnp.sum(w, axis=0)
        den = jnp.where(den > 0, den, 1.0)
        plgpu.store(dst, (num / den[:, None]).astype(out_ref.dtype), mask=o_mask)


def _finish_kernel(*refs, **shape):
    finish_program(pl.program_id(0), pl.program_id(1), pl.program_id(2), *refs, **shape)


@functools.partial(jax.jit, static_argnames=("sm_scale", "window", "cfg", "interpret"))
def select_decode_triton(q, k, v, lengths, groups, n_active, *, sm_scale: float,
                         window: int | None, cfg: AttnConfig, interpret: bool):
    B, Hq, D = q.shape
    _, S, Hkv, _ = k.shape
    A = groups.shape[1]
    G = Hq // Hkv
    ns = cfg.num_splits
    lengths = lengths.astype(jnp.int32)
    groups = groups.astype(jnp.int32)
    n_active = n_active.astype(jnp.int32)
    shape = dict(S=S, Hkv=Hkv, G=G, D=D, A=A, B=B, cfg=cfg, window=window)
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    o_part, lse, out = pl.pallas_call(
        functools.partial(_attn_kernel, scale_log2=float(sm_scale) * LOG2E, **shape),
        out_shape=(jax.ShapeDtypeStruct((B, A, ns, G, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, A, ns, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, G, D), q.dtype)),
        grid=(B, A, ns),
        interpret=interpret,
        compiler_params=params,
        name="select_decode",
    )(q, k, v, lengths, groups, n_active)
    # Second pass, in place on `out`: merge split partials, zero the unselected heads.
    bd = finish_block_d(ns, G, D)
    out = pl.pallas_call(
        functools.partial(_finish_kernel, block_d=bd, **shape),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G, D), q.dtype),
        grid=(B, Hkv, cdiv(D, bd)),
        input_output_aliases={5: 0},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        name="select_decode_finish",
    )(o_part, lse, lengths, groups, n_active, out)
    return out.reshape(B, Hq, D)


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)


def select_decode(q, k, v, lengths, groups, n_active, sm_scale: float | None = None,
                  window: int | None = None, config: AttnConfig | None = None):
    """Backend entry point (validated by selective_attention.select_decode); `config` for benchmarks."""
    check_kernel_dtype(q.dtype, use_interpret())
    scale = float(sm_scale) if sm_scale is not None else default_scale(q.shape[2])
    B, S, Hkv = k.shape[0], k.shape[1], k.shape[2]
    cfg = config or choose_attn_config(B, S, groups.shape[1], q.shape[2], G=q.shape[1] // Hkv)
    return select_decode_triton(q, k, v, lengths, groups, n_active, sm_scale=scale, window=window,
                                cfg=cfg, interpret=use_interpret())
