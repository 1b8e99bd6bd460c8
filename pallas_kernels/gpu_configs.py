"""Every kernel configuration that runs on the GPU: the benchmark sweep (with the configs the
dispatcher picks for it) and the tuning variants the benchmark tries at a few shapes.

The benchmark script and the CUDA cross-lowering test both read this module, so whatever runs
on the GPU has been lowered on CPU first.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from .devices import REFERENCE
from .grid import cdiv
from .selective_attention_triton import AttnConfig, choose_attn_config
from .selective_gemm_triton import (DownConfig, UpConfig, choose_down_config, choose_up_config,
                                    down_split, up_split)

# name -> (d_model K, hidden N, gated)
GEMM_MODELS: dict[str, tuple[int, int, bool]] = {
    "relu_d4096": (4096, 4 * 4096, False),
    "relu_d9216": (9216, 4 * 9216, False),
    "swiglu_4096_11008": (4096, 11008, True),
}
GEMM_MS = (1, 16, 64, 256)
GEMM_DENSITIES = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)

# name -> (Hq, Hkv, D)
ATTN_HEADS: dict[str, tuple[int, int, int]] = {"mha": (32, 32, 128), "gqa": (32, 8, 128)}
ATTN_BS = (1, 16, 64, 256)
ATTN_LS = (512, 2048, 8192)
ATTN_DENSITIES = (1.0, 0.5, 0.3, 0.1)

# Shapes where the benchmark compares tilings (model, M, density): the selective-MLP goal's misses
# of the first sweep (M = 64, and the 67 MB points of M <= 16).
TUNE_GEMM = [("relu_d4096", 1, 0.25), ("relu_d4096", 16, 0.25), ("swiglu_4096_11008", 16, 0.25),
             ("relu_d4096", 64, 0.1), ("relu_d4096", 64, 0.25), ("relu_d4096", 64, 0.5),
             ("relu_d9216", 64, 0.05), ("relu_d9216", 64, 0.25), ("swiglu_4096_11008", 64, 0.25)]
# (heads, B, L, densities) for attention tuning: the shapes under the goals in the first run.
# With the finish kernel, one split needs no partials at all, so fewer splits (smaller
# run-time targets) are worth another look.
TUNE_ATTN = [("mha", 16, 2048, (0.5,)), ("gqa", 256, 512, (0.5,)), ("gqa", 16, 8192, (0.5,)),
             ("gqa", 64, 8192, (0.125,)), ("gqa", 256, 2048, (0.125,))]


def active_count(density: float, n: int) -> int:
    """Active slots for a density (at least one)."""
    return max(1, min(n, int(round(density * n))))


def _up(base: UpConfig, M: int, K: int, A: int, gated: bool, ba: int, bk: int, warps: int,
        stages: int, split_k: int | None = None) -> UpConfig:
    v = dataclasses.replace(base, block_a=ba, block_k=bk, num_warps=warps, num_stages=stages)
    return dataclasses.replace(v, split_k=split_k or up_split(M, K, A, v.block_m, ba, bk, gated))


def up_variants(M: int, K: int, A: int, gated: bool) -> list[UpConfig]:
    """The heuristic's tiling first, then alternatives: split_k=1 drops the f32 partials and the
    epilogue kernel; wider active blocks with 8 warps cut the re-reads of x per weight row."""
    base = choose_up_config(M, K, A, gated, device=REFERENCE)
    if M > 16:
        shapes = [(64, 128, 8, 4, 1), (32, 128, 4, 4, 1), (32, 128, 4, 5, 1), (64, 64, 4, 6, 1)]
    else:
        # M <= 16 runs few programs (128 at d=4096, 25%): deeper pipelines and wider k-steps
        # put more bytes in flight per SM.
        shapes = [(32, 128, 4, 4, 1), (16, 128, 4, 6, 1), (32, 128, 4, 8, 1), (32, 256, 4, 4, 1),
                  (16, 256, 4, 6, 1), (32, 128, 4, 6, 2)]
    out = [base]
    for ba, bk, warps, stages, split in shapes:
        v = _up(base, M, K, A, gated, ba, bk, warps, stages, split)
        if v not in out:
            out.append(v)
    return out


def down_variants(M: int, D: int, A: int) -> list[DownConfig]:
    """The heuristic's tiling first, then other block shapes and split counts; `direct` ones
    (split_j=1, narrow column blocks) need no f32 partials and no epilogue kernel. (Atomic
    accumulation measured 1.1-2x slower than partials at every shape of the first tuning
    run, so it is not tried again.)"""
    base = choose_down_config(M, D, A, device=REFERENCE)

    def v(bj, bd, warps, stages, mult=1.0):
        sj = down_split(M, D, A, base.block_m, bj, bd)
        return DownConfig(base.block_m, bj, bd, max(1, int(round(sj * mult))), warps, stages)

    if M > 16:
        n_blocks = cdiv(M, base.block_m) * cdiv(D, 128)
        cands = [v(128, 128, 8, 3),
                 # the rule before the wave-count rounding (one wave and a bit)
                 DownConfig(base.block_m, 128, 128, cdiv(2 * REFERENCE.num_sms, n_blocks), 8, 3),
                 v(128, 128, 8, 4), v(64, 128, 8, 4), v(128, 128, 4, 3),
                 DownConfig(base.block_m, 128, 64, max(1, 4 * REFERENCE.num_sms // (2 * n_blocks)), 4, 4)]
    else:
        cands = [v(64, 128, 4, 4), v(128, 128, 4, 3), v(128, 64, 4, 5), v(128, 64, 4, 6),
                 v(128, 64, 4, 4, 0.5)]
    out = [base]
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def attn_variants(B: int, S: int, A: int, D: int) -> list[AttnConfig]:
    """The heuristic first, then other run-time split targets (fewer splits = smaller partials
    and combine), a wider key tile and a deeper pipeline."""
    base = choose_attn_config(B, S, A, D, device=REFERENCE)
    out = [base]
    for bs, stages, target in ((64, 2, 528), (64, 2, 264), (64, 2, 2112), (128, 2, 528),
                               (64, 3, 528)):
        v = dataclasses.replace(base, block_s=bs, num_stages=stages, target_programs=target)
        if v not in out:
            out.append(v)
    return out


def gemm_sweep() -> Iterator[tuple[str, int, float, int, int, int, bool]]:
    """(model, M, density, K, N, A, gated) for every point of the GEMM sweep."""
    for model, (K, N, gated) in GEMM_MODELS.items():
        for M in GEMM_MS:
            for dens in GEMM_DENSITIES:
                yield model, M, dens, K, N, active_count(dens, N), gated


def attn_sweep() -> Iterator[tuple[str, int, int, int, int, int]]:
    """(heads, B, L, Hq, Hkv, D) for every cache shape of the attention sweep (the group
    capacity is Hkv; densities vary n_active at run time on one compiled kernel)."""
    for heads, (Hq, Hkv, D) in ATTN_HEADS.items():
        for B in ATTN_BS:
            for L in ATTN_LS:
                yield heads, B, L, Hq, Hkv, D
