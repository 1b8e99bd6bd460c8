"""Probe the selective-MLP shapes that miss the bandwidth goal: per-kernel CUPTI times of tiling
and reduction variants (each checked against the XLA reference on the GPU first), wall-clock
per call for the shipped pair vs the variants (catches work CUPTI's kernel records miss, such
as memsets), and what plain XLA kernels reach at the same byte counts.

    PYTHONPATH=. python benchmarks/kernels/probe_mlp.py --out $OUT [--tiny] [--shapes 0,1]

The committed results (benchmarks/results/raw_2026-11-21_session4/) also include two variants
that were removed after they measured no gain: indices loaded before n_active in gather_up, and
an in-kernel last-arriver reduction of gather_down's partials (commit dbabc7c has that code).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
import pallas_kernels.triton as pktri
from pallas_kernels import gpu_configs as gc
from pallas_kernels import selective_gemm_xla as gx
from pallas_kernels.selective_gemm_triton import (DownConfig, UpConfig, choose_down_config,
                                                  choose_up_config, down_split, up_split)

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import rel  # noqa: E402
from profile_kernels import breakdown, mlp_sets  # noqa: E402

DT = jnp.float16
ROTATE_BYTES = 160e6
# The twelve misses of the third 2026-11-21 sweep (M <= 64, >= 32 MB active, < 75% of copy).
SHAPES = [("relu_d4096", 1, 0.25), ("relu_d4096", 16, 0.25), ("relu_d4096", 64, 0.25),
          ("relu_d4096", 64, 0.5), ("relu_d9216", 1, 0.05), ("relu_d9216", 16, 0.05),
          ("relu_d9216", 64, 0.05), ("relu_d9216", 64, 0.1), ("swiglu_4096_11008", 1, 0.25),
          ("swiglu_4096_11008", 16, 0.25), ("swiglu_4096_11008", 64, 0.25),
          ("swiglu_4096_11008", 64, 0.5)]
SIZES_MB = (16.8, 33.5, 67.1, 134.2, 268.4)


def up_probe_variants(M: int, K: int, A: int, gated: bool) -> list[UpConfig]:
    base = choose_up_config(M, K, A, gated)
    out = [base]
    if M <= 16:
        # one 4-warp program per SM issues ~0.6 instructions per cycle (Nsight Compute): more
        # warps per SM issue the gather address math and copies in parallel
        for ba, bk, warps, stages in ((32, 128, 8, 6), (32, 256, 8, 4), (64, 128, 8, 4)):
            v = dataclasses.replace(base, block_a=ba, block_k=bk, num_warps=warps,
                                    num_stages=stages)
            out.append(dataclasses.replace(v, split_k=up_split(M, K, A, v.block_m, ba, bk, gated)))
    if M > 16 and not gated:
        for ba, bk, warps, stages, split in ((64, 64, 4, 6, 2), (64, 64, 4, 6, 4),
                                             (128, 64, 8, 4, None)):
            v = dataclasses.replace(base, block_a=ba, block_k=bk, num_warps=warps,
                                    num_stages=stages)
            v = dataclasses.replace(v, split_k=split or up_split(M, K, A, v.block_m, ba, bk))
            out.append(v)
    return [v for i, v in enumerate(out) if v not in out[:i]]


def down_probe_variants(M: int, D: int, A: int) -> list[DownConfig]:
    base = choose_down_config(M, D, A)
    out = [base]
    if M > 16:
        out.append(dataclasses.replace(base, split_j=max(2, base.split_j // 2)))
    else:
        out.append(dataclasses.replace(base, num_warps=8))
        for bj, bd, stages in ((128, 128, 3), (64, 128, 4)):
            sj = down_split(M, D, A, base.block_m, bj, bd)
            out.append(DownConfig(base.block_m, bj, bd, sj, 8, stages))
    return [v for i, v in enumerate(out) if v not in out[:i]]


def wall_us(fn, sets, iters: int = 40) -> float:
    """Wall-clock per call over back-to-back calls (launch gaps and memsets included)."""
    g = jax.jit(lambda all_sets: [fn(*s) for s in all_sets])
    jax.block_until_ready(g(sets))
    t0 = time.perf_counter()
    for _ in range(iters):
        r = g(sets)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) * 1e6 / (iters * len(sets))


def probe_shape(key, model: str, M: int, dens: float, tiny: bool) -> dict:
    K, N, gated = gc.GEMM_MODELS[model]
    A = gc.active_count(dens, N)
    nbytes = (3 if gated else 2) * A * K * 2
    R = 1 if tiny else int(max(2, min(12, math.ceil(ROTATE_BYTES / nbytes))))
    sets = mlp_sets(key, M, K, N, A, R)
    n = jnp.int32(A)

    def up_fn(cfg):
        if gated:
            return lambda x, wg, wu, wd, i, h: pktri.gather_up_gated(x, wg, wu, i, n, config=cfg)
        return lambda x, wg, wu, wd, i, h: pktri.gather_up(x, wg, i, n, None, "relu", config=cfg)

    def down_fn(cfg):
        return lambda x, wg, wu, wd, i, h: pktri.gather_down(h, wd, i, n, None, config=cfg)

    if gated:
        up_ref = gx.gather_up_gated_xla(sets[0][0], sets[0][1], sets[0][2], sets[0][4], n)
    else:
        up_ref = gx.gather_up_xla(sets[0][0], sets[0][1], sets[0][4], n, None, "relu")
    down_ref = gx.gather_down_xla(sets[0][5], sets[0][3], sets[0][4], n, None)
    row = dict(model=model, M=M, density=dens, A=A, active_bytes=nbytes, sets=R, up=[], down=[])
    best = {}
    for op, variants, make, ref in (("up", up_probe_variants(M, K, A, gated), up_fn, up_ref),
                                    ("down", down_probe_variants(M, K, A), down_fn, down_ref)):
        for cfg in variants:
            f = make(cfg)
            rec = dict(cfg=dataclasses.asdict(cfg))
            try:
                rec["rel_err"] = rel(jax.jit(f)(*sets[0]), ref)
                if not rec["rel_err"] < 2e-3:
                    raise AssertionError(f"wrong result: rel err {rec['rel_err']:.2e}")
                per = {"wall": 0.0} if tiny else breakdown(f, sets)
                rec["us_per_kernel"] = per
                rec["us"] = sum(per.values())
            except Exception as e:  # noqa: BLE001 (compile failure, out of shared memory)
                rec["error"] = repr(e)[:300]
                rec["us"] = float("nan")
            row[op].append(rec)
            print(f"{model} M={M} {dens:.2f} {op} {cfg}: {rec['us']:.1f} us "
                  f"{rec.get('us_per_kernel', rec.get('error'))}", flush=True)
            if np.isfinite(rec["us"]) and rec["us"] < best.get(op, (math.inf,))[0]:
                best[op] = (rec["us"], cfg)
    # wall clock of the whole MLP, shipped configs vs the fastest variants found above
    pair = {"shipped": (choose_up_config(M, K, A, gated), choose_down_config(M, K, A))}
    if "up" in best and "down" in best:
        pair["fastest"] = (best["up"][1], best["down"][1])
    for name, (u, d) in pair.items():
        fu, fd = up_fn(u), down_fn(d)
        mlp = lambda x, wg, wu, wd, i, h, fu=fu, fd=fd: fd(x, wg, wu, wd, i, fu(x, wg, wu, wd, i, h))
        row[f"wall_{name}_us"] = wall_us(mlp, sets, 3 if tiny else 40)
        row[f"{name}_cfgs"] = [dataclasses.asdict(u), dataclasses.asdict(d)]
        if not tiny:
            per = breakdown(mlp, sets)
            row[f"cupti_{name}_us"] = sum(per.values())
            row[f"cupti_{name}_kernels"] = per
        print(f"  MLP {name}: wall {row[f'wall_{name}_us']:.1f} us, "
              f"CUPTI {row.get(f'cupti_{name}_us', float('nan')):.1f} us", flush=True)
    return row


def size_curve(key, tiny: bool) -> list[dict]:
    """XLA read-only (column sums) and copy kernels at the byte counts of the MLP points."""
    out = []
    for mb in SIZES_MB[:2] if tiny else SIZES_MB:
        rows = int(mb * 1e6 / (4096 * 2)) if not tiny else 64
        R = 1 if tiny else int(max(2, min(12, math.ceil(ROTATE_BYTES / (mb * 1e6)))))
        xs = [jax.random.normal(jax.random.fold_in(key, r), (rows, 4096), DT) for r in range(R)]
        rec = dict(MB=rows * 4096 * 2 / 1e6)
        for name, fn in (("read_sum", lambda x: jnp.sum(x, axis=0, dtype=jnp.float32)),
                         ("copy", lambda x: x + 1)):
            if tiny:
                rec[name + "_us"] = wall_us(fn, [(x,) for x in xs], 2)
            else:
                rec[name + "_us"] = sum(breakdown(fn, [(x,) for x in xs]).values())
        rec["read_sum_TBps"] = rec["MB"] / rec["read_sum_us"]  # MB per us = TB/s
        rec["copy_TBps"] = 2 * rec["MB"] / rec["copy_us"]
        out.append(rec)
        print(f"size {rec['MB']:.1f} MB: XLA column sum {rec['read_sum_us']:.1f} us "
              f"({rec['read_sum_TBps']:.2f} TB/s), copy {rec['copy_us']:.1f} us "
              f"({rec['copy_TBps']:.2f} TB/s r+w)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on small shapes")
    ap.add_argument("--shapes", default="", help="indices into SHAPES, comma-separated")
    args = ap.parse_args()
    shapes = SHAPES
    if args.tiny:
        gc.GEMM_MODELS = {"relu_d4096": (256, 512, False), "swiglu_4096_11008": (128, 300, True)}
        shapes = [("relu_d4096", 1, 0.25), ("relu_d4096", 64, 0.5), ("swiglu_4096_11008", 16, 0.25)]
    elif args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    dev = jax.devices()[0]
    report = dict(device=dev.device_kind, jax=jax.__version__,
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  command=" ".join([sys.executable] + sys.argv), shapes=[])
    key = jax.random.PRNGKey(int(time.time()))
    report["sizes"] = size_curve(key, args.tiny)
    for model, M, dens in shapes:
        key, sub = jax.random.split(key)
        report["shapes"].append(probe_shape(sub, model, M, dens, args.tiny))
        with open(os.path.join(args.out, "probe_mlp.json"), "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
