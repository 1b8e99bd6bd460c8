"""Every kernel configuration that runs on the GPU: the benchmark sweep (with the configs the
dispatcher picks for it) and the tuning variants the benchmark tries at a few shapes.

The benchmark script and the CUDA cross-lowering test both read this module, so whatever runs
on the GPU has been lowered on CPU first.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from .selective_attention_triton import AttnConfig, choose_attn_config
from .selective_gemm_triton import DownConfig, UpConfig, choose_down_config, choose_up_config

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

# Shapes where the benchmark compares a few tilings before the sweep.
TUNE_GEMM = [("relu_d4096", 1, 0.1), ("relu_d4096", 64, 0.1), ("relu_d4096", 64, 0.5),
             ("relu_d9216", 16, 0.25), ("relu_d4096", 256, 0.5)]
TUNE_ATTN = [("gqa", 16, 2048), ("mha", 64, 8192), ("mha", 16, 2048)]


def active_count(density: float, n: int) -> int:
    """Active slots for a density (at least one)."""
    return max(1, min(n, int(round(density * n))))


def up_variants(M: int, K: int, A: int, gated: bool) -> list[UpConfig]:
    base = choose_up_config(M, K, A, gated)
    out = [base]
    for ba, bk, warps, stages in ((16, 256, 4, 3), (32, 512, 4, 3), (64, 256, 8, 3),
                                  (32, 256, 4, 4), (32, 128, 4, 4)):
        v = dataclasses.replace(base, block_a=ba, block_k=bk, num_warps=warps, num_stages=stages)
        n_kb = -(-K // bk)
        v = dataclasses.replace(v, split_k=max(d for d in range(1, n_kb + 1)
                                               if n_kb % d == 0 and d <= max(base.split_k, 1)))
        if v not in out:
            out.append(v)
    return out


def down_variants(M: int, D: int, A: int) -> list[DownConfig]:
    base = choose_down_config(M, D, A)
    out = [base]
    for bj, bd, warps, stages, sj_mult in ((64, 128, 4, 3, 1), (32, 128, 4, 3, 2),
                                           (32, 256, 8, 3, 1), (16, 256, 4, 4, 2)):
        v = DownConfig(base.block_m, bj, bd, max(1, base.split_j * sj_mult), warps, stages)
        if v not in out:
            out.append(v)
    return out


def attn_variants(B: int, S: int, A: int, D: int) -> list[AttnConfig]:
    base = choose_attn_config(B, S, A, D)
    out = [base]
    for bs, warps, stages in ((32, 4, 2), (128, 4, 2), (64, 4, 3), (64, 8, 2)):
        v = dataclasses.replace(base, block_s=bs, num_warps=warps, num_stages=stages)
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
