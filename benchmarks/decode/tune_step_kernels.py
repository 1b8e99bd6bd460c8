"""Tilings of the decode step's kernels at the OPT-6.7B decode shapes, on the H200 (CUPTI, inputs rotated
past the 60 MB L2, each variant checked against the XLA reference first).

Shapes are what `polar-jax bench decode` runs: selective MLP at the calibrated capacity (1.5x the union
target) with the target live, head-selective attention at 9 of 32 heads and dense, the fused router
selection at rank 1024 and 128, and the router's first matmul in both weight layouts.

    PYTHONPATH=. python benchmarks/decode/tune_step_kernels.py --out $OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
import pallas_kernels.triton as pktri
from pallas_kernels import gpu_configs as gc
from pallas_kernels.union_select_triton import SelectConfig, choose_select_config

DT = jnp.bfloat16
ROTATE = 200e6
OUT: list = []


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) if np.all(np.isfinite(a)) else float("inf")


def cupti_us(fn, sets, iters: int = 15) -> float:
    from jax.experimental.mosaic.gpu import profiler

    g = jax.jit(lambda s: [fn(*a) for a in s])
    try:
        _, t = profiler.measure(g, iterations=iters)(sets)
    except Exception as e:  # noqa: BLE001 - a config that does not fit is a finding
        print("   FAILED", repr(e)[:200], flush=True)
        return float("nan")
    t = t if isinstance(t, list) else [t]
    return statistics.median(t) * 1e3 / len(sets)


def n_sets(nbytes: float) -> int:
    return int(max(2, min(12, math.ceil(ROTATE / nbytes))))


def record(**row) -> None:
    OUT.append(row)
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def tune_union(key) -> None:
    N, d = 16384, 4096
    for rank in (1024, 128):
        for B in (1, 32):
            sets = []
            for _ in range(n_sets(rank * N * 2)):
                key, k1, k2 = jax.random.split(key, 3)
                sets.append((jax.random.normal(k1, (B, rank), DT),
                             (jax.random.normal(k2, (rank, N), jnp.float32) * rank**-0.5).astype(DT),
                             jnp.ones((B,), bool), jnp.float32(1.5 + 0.3 * math.log2(B))))
            want = pk.union_select(*sets[0], 4096, impl="xla")
            base = choose_select_config(B, rank, N)
            cands = [base] + [dataclasses.replace(base, block_n=bn, block_r=br, num_warps=w, num_stages=st)
                              for bn, br, w, st in ((32, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3), (64, 128, 4, 4),
                                                    (64, 64, 4, 4), (128, 64, 8, 3), (32, 256, 4, 4), (128, 128, 8, 4))]
            for cfg in dict.fromkeys(cands):
                if cfg.block_r > rank:
                    continue
                f = lambda u, w, l, t, cfg=cfg: pktri.union_select(u, w, l, t, 4096, config=cfg)
                got = f(*sets[0])
                ok = int(got[1]) == int(want[1])
                record(op="union_select", rank=rank, B=B, cfg=dataclasses.asdict(cfg), ok=ok, us=cupti_us(f, sets))
            record(op="union_select_xla", rank=rank, B=B,
                   us=cupti_us(lambda u, w, l, t: pk.union_select(u, w, l, t, 4096, impl="xla"), sets))
    for B in (1, 32):  # the router's first matmul, both layouts
        sets = []
        for _ in range(n_sets(d * 1024 * 2)):
            key, k1, k2 = jax.random.split(key, 3)
            sets.append((jax.random.normal(k1, (B, d), DT), jax.random.normal(k2, (1024, d), DT)))
        record(op="router_a [r,d]", B=B, us=cupti_us(
            lambda x, a: jnp.einsum("bd,rd->br", x, a, preferred_element_type=jnp.float32).astype(DT), sets))
        record(op="router_a [d,r]", B=B, us=cupti_us(
            lambda x, a: jnp.dot(x, a.T.copy(), preferred_element_type=jnp.float32).astype(DT),
            [(x, a.T) for x, a in sets]))


def tune_mlp(key) -> None:
    K, N = 4096, 16384
    for M, dens in ((1, 0.075), (8, 0.175), (32, 0.374), (64, 0.49)):
        n = int(round(dens * N))
        A = min(N, int(math.ceil(1.5 * n / 128)) * 128)
        sets = []
        for _ in range(n_sets(n * K * 2)):
            key, *ks = jax.random.split(key, 5)
            sets.append((jax.random.normal(ks[0], (M, K), DT), (jax.random.normal(ks[1], (N, K), DT) * 0.02).astype(DT),
                         jnp.sort(jax.random.permutation(ks[2], N)[:A]).astype(jnp.int32),
                         jax.random.normal(ks[3], (M, A), DT)))
        nn = jnp.int32(n)
        want_up = pk.gather_up(*sets[0][:3], nn, None, "relu", impl="xla")
        want_down = pk.gather_down(sets[0][3], sets[0][1], sets[0][2], nn, None, impl="xla")
        for cfg in gc.up_variants(M, K, A, False):
            f = lambda x, w, i, h, cfg=cfg: pktri.gather_up(x, w, i, nn, None, "relu", config=cfg)
            record(op="gather_up", M=M, n=n, A=A, cfg=dataclasses.asdict(cfg), err=rel(f(*sets[0]), want_up),
                   us=cupti_us(f, sets))
        for cfg in gc.down_variants(M, K, A):
            f = lambda x, w, i, h, cfg=cfg: pktri.gather_down(h, w, i, nn, None, config=cfg)
            record(op="gather_down", M=M, n=n, A=A, cfg=dataclasses.asdict(cfg), err=rel(f(*sets[0]), want_down),
                   us=cupti_us(f, sets))


def tune_attn(key) -> None:
    Hq = Hkv = 32
    D, S = 128, 2056
    for B in (8, 32, 64):
        for a in (9, 32):
            sets = []
            for _ in range(n_sets(2 * B * S * a * D * 2)):
                key, *ks = jax.random.split(key, 5)
                sets.append((jax.random.normal(ks[0], (B, Hq, D), DT), jax.random.normal(ks[1], (B, S, Hkv, D), DT),
                             jax.random.normal(ks[2], (B, S, Hkv, D), DT), jnp.full((B,), 2049, jnp.int32),
                             jnp.argsort(jax.random.uniform(ks[3], (B, Hkv)), axis=1)[:, :a].astype(jnp.int32),
                             jnp.full((B,), a, jnp.int32)))
            want = pk.select_decode(*sets[0], impl="xla")
            base = pktri._attn.choose_attn_config(B, S, a, D)
            cands = gc.attn_variants(B, S, a, D) + [dataclasses.replace(base, target_programs=t, num_stages=st, block_s=bs)
                                                    for t, st, bs in ((2112, 3, 64), (4224, 2, 64), (1056, 3, 128),
                                                                      (2112, 2, 128))]
            for cfg in dict.fromkeys(cands):
                f = lambda q, k, v, l, g, nn, cfg=cfg: pktri.select_decode(q, k, v, l, g, nn, config=cfg)
                us = cupti_us(f, sets)
                gb = 2 * B * 2049 * a * D * 2 / 1e9
                record(op="select_decode", B=B, active=a, cfg=dataclasses.asdict(cfg), err=rel(f(*sets[0]), want),
                       us=us, TBps=gb / (us * 1e-6) / 1e3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--parts", default="union,mlp,attn")
    args = ap.parse_args()
    key = jax.random.key(5)
    try:
        for part in args.parts.split(","):
            {"union": tune_union, "mlp": tune_mlp, "attn": tune_attn}[part](key)
    finally:
        with open(os.path.join(args.out, "tune_step_kernels.json"), "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                       "command": "python benchmarks/decode/tune_step_kernels.py " + " ".join(sys.argv[1:]),
                       "rows": OUT}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
