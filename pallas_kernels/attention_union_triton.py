"""Pallas (Triton backend): head-selective flash decoding and the MLP router's selection in shared launches.

The MLP router's selection (`union_select`) reads the layer input's router product and the router's second
matrix; nothing in it waits for attention. Run apart, the two ops are four kernels per layer, and two of them
(select_decode at small batch, union_mask) leave most of the memory bandwidth idle for part of their time:
- B=1, OPT-6.7B, H100 (benchmarks/results/raw_2026-12-08_h100/call1_goals_opt.json): select_decode reads
  ~9 MB per sparse layer over ~144 short programs (326 MB per step in 32 launches of 8.2 us on average:
  1.2 TB/s), union_mask 33.5 MB in 14.0 us (2.4 TB/s);
- B=32: select_decode 107 us, union_mask 15.6 us (68 % of the bandwidth), each with its ramp and last wave.
Here each pair shares one launch, with the programs of both in one grid:
1. select_decode's (sequence, slot, split) programs, then union_mask's neuron blocks (or the blocks first:
   `OverlapConfig.mask_first`). The blocks stream the router matrix while attention's programs run and drain.
2. select_decode_finish's (sequence, group, column block) programs, then union_compact's blocks.
A program runs exactly the code of the kernel it comes from (`attn_program`, `mask_program`, ...), so both
results are those of the two ops apart, bit for bit. One compile setting (warps, pipeline stages) serves the
whole launch: the attention kernel's unless the config says otherwise.
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
from .grid import cdiv
from .selective_attention_triton import (LOG2E, AttnConfig, attn_program, attn_smem, choose_attn_config,
                                         default_scale, finish_block_d, finish_program)
from .selective_attention_triton import select_decode as attention_apart
from .union_select_triton import SelectConfig, choose_select_config, compact_program, mask_program, mask_smem
from .union_select_triton import union_select as union_apart
from .validation import check_kernel_dtype


@dataclasses.dataclass(frozen=True)
class OverlapConfig:
    attn: AttnConfig
    select: SelectConfig
    mask_first: bool = False  # union_mask's programs before attention's in the first launch's grid
    num_warps: int | None = None  # None: the attention kernel's
    num_stages: int | None = None  # None: the attention kernel's


def overlap_smem(cfg: OverlapConfig, G: int, D: int) -> int:
    """Shared memory of the first launch, counted as both programs' buffers at once (the bound that does not
    rely on the compiler reusing one branch's buffers for the other)."""
    stages = cfg.num_stages or cfg.attn.num_stages
    return (attn_smem(dataclasses.replace(cfg.attn, num_stages=stages), G, D)
            + mask_smem(dataclasses.replace(cfg.select, num_stages=stages)))


def choose_overlap_config(B: int, S: int, A: int, D: int, G: int, r: int, N: int,
                          device: DeviceClass | None = None) -> OverlapConfig | None:
    """Each op's own tiling, or None where the shared launch would not fit the device's shared memory (the
    ops then run apart)."""
    dev = device or current_device_class()
    cfg = OverlapConfig(choose_attn_config(B, S, A, D, G, dev), choose_select_config(B, r, N, dev))
    return cfg if overlap_smem(cfg, G, D) <= dev.smem_per_block else None


def _first_kernel(q_ref, k_ref, v_ref, len_ref, grp_ref, nact_ref, u_ref, w_ref, live_ref, t_ref,
                  o_ref, lse_ref, out_ref, keep_ref, cnt_ref, *, attn_dims, n_mask, mask_first, attn_kw, mask_kw):
    B, A, ns = attn_dims
    n_attn = B * A * ns
    pid = pl.program_id(0)
    attn_pid = pid - n_mask if mask_first else pid
    mask_pid = pid if mask_first else pid - n_attn

    @pl.when((attn_pid >= 0) & (attn_pid < n_attn))
    def _attention():
        b, rest = attn_pid // (A * ns), attn_pid % (A * ns)
        attn_program(b, rest // ns, rest % ns, q_ref, k_ref, v_ref, len_ref, grp_ref, nact_ref, o_ref, lse_ref,
                     out_ref, **attn_kw)

    @pl.when((mask_pid >= 0) & (mask_pid < n_mask))
    def _mask():
        mask_program(mask_pid, u_ref, w_ref, live_ref, t_ref, keep_ref, cnt_ref, **mask_kw)


def _second_kernel(o_ref, lse_ref, len_ref, grp_ref, nact_ref, out_in, keep_ref, cnt_ref, out_ref, idx_ref,
                   total_ref, *, finish_dims, n_mask, finish_kw, compact_kw):
    B, Hkv, nc = finish_dims
    n_finish = B * Hkv * nc
    pid = pl.program_id(0)

    @pl.when(pid < n_finish)
    def _finish():
        b, rest = pid // (Hkv * nc), pid % (Hkv * nc)
        finish_program(b, rest // nc, rest % nc, o_ref, lse_ref, len_ref, grp_ref, nact_ref, out_in, out_ref,
                       **finish_kw)

    @pl.when(pid >= n_finish)
    def _compact():
        compact_program(pid - n_finish, keep_ref, cnt_ref, idx_ref, total_ref, **compact_kw)


@functools.partial(jax.jit, static_argnames=("sm_scale", "window", "capacity", "u_offset", "clamp", "w_layout",
                                             "cfg", "interpret"))
def select_decode_union_triton(q, k, v, lengths, groups, n_active, u, w, live, threshold, *, sm_scale: float,
                               window: int | None, capacity: int, u_offset: int, clamp: bool, w_layout: str,
                               cfg: OverlapConfig, interpret: bool):
    """(select_decode's output [B, Hq, D], union_select's ids [capacity], its count) in two launches."""
    B, Hq, D = q.shape
    _, S, Hkv, _ = k.shape
    A = groups.shape[1]
    G = Hq // Hkv
    ac, sc = cfg.attn, cfg.select
    ns = ac.num_splits
    R, N = w.shape if w_layout == "rn" else w.shape[::-1]
    n_mask = cdiv(N, sc.block_n)
    if n_mask * sc.block_n < capacity:
        raise ValueError("capacity larger than the padded neuron count")
    shape = dict(S=S, Hkv=Hkv, G=G, D=D, A=A, B=B, cfg=ac, window=window)
    lengths, groups, n_active = (a.astype(jnp.int32) for a in (lengths, groups, n_active))
    params = plgpu.CompilerParams(num_warps=cfg.num_warps or ac.num_warps,
                                  num_stages=cfg.num_stages or ac.num_stages)
    o_part, lse, out, keep, counts = pl.pallas_call(
        functools.partial(_first_kernel, attn_dims=(B, A, ns), n_mask=n_mask, mask_first=cfg.mask_first,
                          attn_kw=dict(scale_log2=float(sm_scale) * LOG2E, **shape),
                          mask_kw=dict(B=B, R=R, N=N, u_offset=u_offset, w_layout=w_layout, cfg=sc)),
        out_shape=(jax.ShapeDtypeStruct((B, A, ns, G, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, A, ns, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, G, D), q.dtype),
                   jax.ShapeDtypeStruct((n_mask * sc.block_n,), jnp.int32),
                   jax.ShapeDtypeStruct((n_mask,), jnp.int32)),
        grid=(B * A * ns + n_mask,), interpret=interpret, compiler_params=params, name="select_decode_mask",
    )(q, k, v, lengths, groups, n_active, u, w, live.astype(jnp.int32),
      jnp.reshape(threshold.astype(jnp.float32), (1,)))
    bd = finish_block_d(ns, G, D)
    nc = cdiv(D, bd)
    out, idx, total = pl.pallas_call(
        functools.partial(_second_kernel, finish_dims=(B, Hkv, nc), n_mask=n_mask,
                          finish_kw=dict(block_d=bd, **shape),
                          compact_kw=dict(N=N, cap=capacity, n_blocks=n_mask, clamp=clamp, cfg=sc)),
        out_shape=(jax.ShapeDtypeStruct((B, Hkv, G, D), q.dtype), jax.ShapeDtypeStruct((capacity,), jnp.int32),
                   jax.ShapeDtypeStruct((1,), jnp.int32)),
        grid=(B * Hkv * nc + n_mask,), input_output_aliases={5: 0}, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), name="select_decode_finish_compact",
    )(o_part, lse, lengths, groups, n_active, out, keep, counts)
    return out.reshape(B, Hq, D), idx, total[0]


def select_decode_union(q, k, v, lengths, groups, n_active, u, w, live, threshold, capacity: int,
                        sm_scale: float | None = None, window: int | None = None, u_offset: int = 0,
                        clamp: bool = False, w_layout: str = "rn", config: OverlapConfig | None = None):
    """Backend entry point (validated by attention_union.select_decode_union); `config` for benchmarks. Where
    the shared launch does not fit the device's shared memory, the two ops run apart."""
    check_kernel_dtype(q.dtype, use_interpret())
    B, S, Hkv = k.shape[0], k.shape[1], k.shape[2]
    R, N = w.shape if w_layout == "rn" else w.shape[::-1]
    cfg = config or choose_overlap_config(B, S, groups.shape[1], q.shape[2], q.shape[1] // Hkv, R, N)
    if cfg is None:
        out = attention_apart(q, k, v, lengths, groups, n_active, sm_scale, window)
        return (out, *union_apart(u, w, live, threshold, capacity, u_offset, clamp, w_layout))
    scale = float(sm_scale) if sm_scale is not None else default_scale(q.shape[2])
    return select_decode_union_triton(q, k, v, lengths, groups, n_active, u, w, live, threshold, sm_scale=scale,
                                      window=window, capacity=capacity, u_offset=u_offset, clamp=clamp,
                                      w_layout=w_layout, cfg=cfg, interpret=use_interpret())
