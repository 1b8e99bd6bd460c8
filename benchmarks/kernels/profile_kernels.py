"""Where the time goes at the shapes that miss the goals: per-kernel CUPTI times, and a small
program for Nsight Compute.

    # per-kernel times (our kernel vs its XLA epilogue), rotated inputs, medians:
    PYTHONPATH=. python benchmarks/kernels/profile_kernels.py --mode breakdown --out $OUT
    # hardware counters: run each call once, filter the kernels by name in ncu
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \\
    ncu --target-processes application-only --kernel-name regex:'gather|select' \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section LaunchStats --section WarpStateStats --csv --page details \\
        python benchmarks/kernels/profile_kernels.py --mode once --out $OUT

`once` keeps the device memory small (no preallocation, one input set per case): Nsight Compute
saves and restores the memory a kernel may touch for each replay pass, and an earlier attempt
with JAX's default 75% preallocation attached but produced nothing within the call's time limit.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import gpu_configs as gc

DT = jnp.float16
ROTATE_BYTES = 160e6  # rotate input sets past the 50 MB L2, as the benchmark does

# (name, model, M, density) for the MLP and (name, heads, B, L, density) for attention
MLP_CASES = [("relu_d4096 M=64 50%", "relu_d4096", 64, 0.5),
             ("relu_d4096 M=64 10%", "relu_d4096", 64, 0.1),
             ("relu_d4096 M=16 25%", "relu_d4096", 16, 0.25),
             ("relu_d9216 M=64 25%", "relu_d9216", 64, 0.25)]
ATTN_CASES = [("mha B=16 L=2048 50%", "mha", 16, 2048, 0.5),
              ("gqa B=256 L=512 50%", "gqa", 256, 512, 0.5),
              ("gqa B=16 L=8192 50%", "gqa", 16, 8192, 0.5)]


def _sets(active_bytes: float, once: bool) -> int:
    return 1 if once else int(max(1, min(12, math.ceil(ROTATE_BYTES / active_bytes))))


def mlp_sets(key, M: int, K: int, N: int, A: int, R: int) -> list[tuple]:
    """R fresh input sets (x, w_gate|w_up, w_up, w_down, idx, h) for one MLP shape."""
    sets = []
    for _ in range(R):
        key, *ks = jax.random.split(key, 7)
        sets.append((jax.random.normal(ks[0], (M, K), DT),
                     (jax.random.normal(ks[1], (N, K), DT) * 0.02).astype(DT),
                     (jax.random.normal(ks[2], (N, K), DT) * 0.02).astype(DT),
                     (jax.random.normal(ks[3], (N, K), DT) * 0.02).astype(DT),
                     jax.random.permutation(ks[4], N)[:A].astype(jnp.int32),
                     jax.random.normal(ks[5], (M, A), DT)))
    return sets


def mlp_case(key, model: str, M: int, dens: float, once: bool):
    """[(op, fn, arg_sets)] for the up and down kernels of one MLP shape."""
    K, N, gated = gc.GEMM_MODELS[model]
    A = gc.active_count(dens, N)
    sets = mlp_sets(key, M, K, N, A, _sets((3 if gated else 2) * A * K * 2, once))
    n = jnp.int32(A)
    if gated:
        up = lambda x, wg, wu, wd, i, h: pk.gather_up_gated(x, wg, wu, i, n, impl="triton")
    else:
        up = lambda x, wg, wu, wd, i, h: pk.gather_up(x, wg, i, n, None, "relu", impl="triton")
    down = lambda x, wg, wu, wd, i, h: pk.gather_down(h, wd, i, n, None, impl="triton")
    return [("up", up, sets), ("down", down, sets)]


def attn_case(key, heads: str, B: int, L: int, dens: float, once: bool):
    Hq, Hkv, D = gc.ATTN_HEADS[heads]
    a = gc.active_count(dens, Hkv)
    sets = []
    for _ in range(_sets(2 * B * L * a * D * 2, once)):
        key, *ks = jax.random.split(key, 5)
        sets.append((jax.random.normal(ks[0], (B, Hq, D), DT),
                     jax.random.normal(ks[1], (B, L, Hkv, D), DT),
                     jax.random.normal(ks[2], (B, L, Hkv, D), DT),
                     jnp.full((B,), L, jnp.int32),
                     jnp.argsort(jax.random.uniform(ks[3], (B, Hkv)), axis=1).astype(jnp.int32),
                     jnp.full((B,), a, jnp.int32)))
    # lengths, groups and counts are arguments (as in a decode step), not captured constants
    fn = lambda q, k, v, l, g, n: pk.select_decode(q, k, v, l, g, n, impl="triton")
    return [("select_decode", fn, sets)]


def cases(key, once: bool):
    for name, model, M, dens in MLP_CASES:
        if once and "d9216" in model:  # 2 GB of weights: keep ncu's replay memory small
            continue
        key, sub = jax.random.split(key)
        for op, fn, sets in mlp_case(sub, model, M, dens, once):
            yield f"{name} {op}", fn, sets
    for name, heads, B, L, dens in ATTN_CASES:
        key, sub = jax.random.split(key)
        for op, fn, sets in attn_case(sub, heads, B, L, dens, once):
            yield f"{name} {op}", fn, sets


def breakdown(fn, sets, iters: int = 15) -> dict[str, float]:
    """Median per-call time (us) of each kernel name that one call of fn launches."""
    from jax.experimental.mosaic.gpu import profiler

    g = jax.jit(lambda all_sets: [fn(*s) for s in all_sets])
    _, per_iter = profiler.measure(g, aggregate=False, iterations=iters)(sets)
    by_name = collections.defaultdict(list)
    for timings in per_iter:
        sums = collections.Counter()
        for name, ms in timings:
            sums[name] += ms
        for name, ms in sums.items():
            by_name[name].append(ms * 1e3 / len(sets))
    return {name: statistics.median(v) for name, v in by_name.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("breakdown", "once"), default="breakdown")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    once = args.mode == "once"
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "command": " ".join([sys.executable] + sys.argv), "cases": {}}
    for name, fn, sets in cases(jax.random.PRNGKey(0), once):
        if once:
            jax.block_until_ready(jax.jit(fn)(*sets[0]))
            report["cases"][name] = "run once"
            print("ran", name, flush=True)
            continue
        per = breakdown(fn, sets)
        report["cases"][name] = {"sets": len(sets), "us_per_kernel": per,
                                 "us_total": sum(per.values())}
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
        print(f"{name}: total {sum(per.values()):.1f} us = {parts}", flush=True)
    with open(os.path.join(args.out, f"profile_{args.mode}.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
