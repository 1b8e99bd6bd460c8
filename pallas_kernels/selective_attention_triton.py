"""Pallas (Triton backend) head/group-selective flash decoding over the native KV-cache layout.

One program per (sequence b, active group slot j, KV split). The program loads [block_s, D] tiles
of its group's keys and values straight from the [B, S, Hkv, D] cache (rows of D contiguous
elements, stride Hkv*D between keys: no transpose, no copy) and uses each tile for all Hq/Hkv
query heads of the group at once (query rows padded to 16 for tl.dot and masked), so every
selected group's KV is read exactly once. Softmax is online in float32 (base-2 exponentials).

The grid is static: (B, A slots, max splits). Each program derives its key range from the live
length of its sequence (and the sliding window), so splits follow the live lengths; programs
whose slot is past n_active[b], or whose range is empty, only mark their partial as empty.
Partials (normalised f32 output and log2-sum-exp) are merged by a small XLA epilogue that also
scatters slots back to heads (unselected heads are zero; duplicated groups are written once).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .grid import NUM_SMS, cdiv, pow2_at_least
from .slots import scatter_slots

TARGET_PROGRAMS = 8 * NUM_SMS  # live programs wanted per call (several per SM for balance)
LOG2E = 1.4426950408889634




@dataclasses.dataclass(frozen=True)
class AttnConfig:
    block_s: int
    num_splits: int
    min_chunk: int
    num_warps: int
    num_stages: int
    target_programs: int = TARGET_PROGRAMS  # live programs the run-time split count aims for


def choose_attn_config(B: int, S: int, A: int, D: int) -> AttnConfig:
    """Static bounds of the grid: `num_splits` is the most KV splits any (sequence, slot) may use.

    It is sized for the sparsest case (one live slot per sequence) and capped by the cache
    capacity; the kernel picks the split count it actually uses at run time from the live slot
    count (sum of n_active) and the live lengths, and programs beyond it exit at once."""
    del A, D
    block_s = 64
    min_chunk = 256
    max_splits = max(1, cdiv(S, min_chunk))
    num_splits = max(1, min(max_splits, 64, cdiv(TARGET_PROGRAMS, max(1, B))))
    return AttnConfig(block_s=block_s, num_splits=num_splits, min_chunk=min_chunk,
                      num_warps=4, num_stages=2)


def runtime_splits(total_active, num_splits: int, target: int = TARGET_PROGRAMS):
    """Splits used at run time: enough (sequence, slot, split) programs to fill the GPU."""
    want = (target + jnp.maximum(total_active, 1) - 1) // jnp.maximum(total_active, 1)
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


def _attn_kernel(q_ref, k_ref, v_ref, len_ref, grp_ref, nact_ref, o_ref, lse_ref, *,
                 S, Hkv, G, D, A, B, cfg: AttnConfig, window, scale_log2):
    bs = cfg.block_s
    gp = pow2_at_least(G, 16)
    dp = pow2_at_least(D, 16)
    b, j, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = nact_ref[b]
    L = jnp.clip(len_ref[b], 0, S)
    bp = pow2_at_least(B)
    b_all = jnp.arange(bp, dtype=jnp.int32)
    n_all = plgpu.load(nact_ref.at[pl.ds(0, bp)], mask=b_all < B, other=0)
    total = jnp.sum(jnp.clip(n_all, 0, A))
    splits = runtime_splits(total, cfg.num_splits, cfg.target_programs)
    lo, hi = _split_range(L, splits, bs, cfg.min_chunk, window, sp)
    valid = (j < n) & (lo < hi)
    rows = jnp.arange(gp, dtype=jnp.int32)
    r_ok = rows < G

    @pl.when(valid)
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
        plgpu.store(o_ref.at[b, j, sp, pl.ds(0, gp), pl.ds(0, dp)], out, mask=o_mask)
        plgpu.store(lse_ref.at[b, j, sp, pl.ds(0, gp)], m_i + jnp.log2(l_i), mask=r_ok)

    @pl.when(jnp.logical_not(valid))
    def _empty():
        # Only the log-sum-exp marks an empty partial; the epilogue never reads its output.
        plgpu.store(lse_ref.at[b, j, sp, pl.ds(0, gp)], jnp.full((gp,), -jnp.inf, jnp.float32),
                    mask=r_ok)


def combine_partials(o_part, lse, groups, n_active, Hkv: int, out_dtype):
    """Merge split partials [B, A, NS, G, D] and scatter slots to heads -> [B, Hkv*G, D]."""
    B, A, _, G, D = o_part.shape
    mx = jnp.max(lse, axis=2, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w = jnp.exp2(lse - mx)  # 0 for empty partials
    den = jnp.sum(w, axis=2)
    num = jnp.sum(jnp.where(w[..., None] > 0, w[..., None] * o_part, 0.0), axis=2)
    slot_out = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
    return scatter_slots(slot_out, groups, n_active, Hkv, out_dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "window", "cfg", "interpret"))
def select_decode_triton(q, k, v, lengths, groups, n_active, *, sm_scale: float,
                         window: int | None, cfg: AttnConfig, interpret: bool):
    B, Hq, D = q.shape
    _, S, Hkv, _ = k.shape
    A = groups.shape[1]
    G = Hq // Hkv
    ns = cfg.num_splits
    kernel = functools.partial(_attn_kernel, S=S, Hkv=Hkv, G=G, D=D, A=A, B=B, cfg=cfg,
                               window=window,
                               scale_log2=float(sm_scale) * LOG2E)
    o_part, lse = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, A, ns, G, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, A, ns, G), jnp.float32)),
        grid=(B, A, ns),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="select_decode",
    )(q, k, v, lengths.astype(jnp.int32), groups.astype(jnp.int32), n_active.astype(jnp.int32))
    return combine_partials(o_part, lse, groups.astype(jnp.int32), n_active.astype(jnp.int32),
                            Hkv, q.dtype)


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)
