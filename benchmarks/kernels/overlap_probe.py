"""Attention and the MLP router's selection: apart (four kernels) against shared launches (two), per kernel.

`pallas_kernels.select_decode_union` runs union_mask's neuron blocks in select_decode's launch and
union_compact in the finish kernel's. The decode-step A/B (step_variants `overlap`) says what the step gains;
this says where: the CUPTI time of each kernel per call, apart and shared, at OPT-6.7B's layer shapes (32 heads
of 128, context 2048, 9 heads per sequence, the rank-1024 router's float32 product after 32 head columns,
16384 neurons, the paper's union density per batch size), with the KV cache and router matrix rotated over
enough sets to leave L2. Every shared result is first checked equal to the ops apart.

    PYTHONPATH=. python benchmarks/kernels/overlap_probe.py --out $OUT
    PYTHONPATH=. python benchmarks/kernels/overlap_probe.py --tiny --out /tmp/o   # code path on CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import attention_union_triton as au
from pallas_kernels import selective_attention_triton as sa
from pallas_kernels import union_select_triton as us

sys.path.insert(0, os.path.dirname(__file__))
from gather_probe import measure_into  # noqa: E402


def inputs(B: int, tiny: bool, seed: int = 0):
    """One layer's attention and router inputs, `sets` copies of the big arrays (cache, router matrix)."""
    if tiny:
        H, D, S, A, R, N, U, sets, dt = 4, 16, 96, 2, 24, 256, 4, 1, jnp.float32
    else:
        H, D, S, A, R, N, U, dt = 32, 128, 2048, 9, 1024, 16384, 32, jnp.bfloat16
        sets = max(2, -(-200 * 2**20 // (2 * B * S * H * D * 2 + R * N * 2)))  # > 200 MB per rotation
    rng = np.random.default_rng(seed + B)
    key = jax.random.key(seed + B)
    q = jax.random.normal(key, (B, H, D), dt)
    caches = [tuple(jax.random.normal(jax.random.fold_in(key, 2 * i + j), (B, S, H, D), dt) for j in (1, 2))
              for i in range(sets)]
    ws = [(jax.random.normal(jax.random.fold_in(key, 100 + i), (R, N), dt) * R**-0.5).astype(dt) for i in range(sets)]
    lengths = jnp.full((B,), S - 1, jnp.int32)
    groups = jnp.asarray(np.stack([rng.permutation(H)[:A] for _ in range(B)]), jnp.int32)
    n_active = jnp.full((B,), A, jnp.int32)
    u = jax.random.normal(jax.random.fold_in(key, 999), (B, U + R), jnp.float32)
    live = jnp.ones((B,), bool)
    # the threshold that keeps about the paper's union at this batch size (0.075 at 1 row ... 0.374 at 32)
    density = float(np.interp(B, [1, 8, 32], [0.075, 0.175, 0.374]))
    logits = np.asarray(u[:, U:].astype(dt).astype(jnp.float32)) @ np.asarray(ws[0].astype(jnp.float32))
    threshold = jnp.float32(np.quantile(logits.max(axis=0), 1 - density))
    capacity = min(N, int(-(-density * N * 1.25 // 64) * 64))
    return dict(q=q, caches=caches, ws=ws, lengths=lengths, groups=groups, n_active=n_active, u=u, live=live,
                threshold=threshold, capacity=capacity, U=U, bytes=2 * B * S * A * D * 2 + R * N * 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on small shapes (interpret mode)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    res = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
           "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "rows": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "overlap_probe.json")
    for B in args.batches:
        p = inputs(B, args.tiny)
        U, cap = p["U"], p["capacity"]
        S, Hkv, D = p["caches"][0][0].shape[1:]
        cfg = au.choose_overlap_config(B, S, p["groups"].shape[1], D, 1, p["ws"][0].shape[0], p["ws"][0].shape[1])
        variants = {"apart": None, "shared": cfg, "shared_mask_first": dataclasses.replace(cfg, mask_first=True),
                    "shared_st3": dataclasses.replace(cfg, num_stages=3)}
        sets = [(k, v, w) for (k, v), w in zip(p["caches"], p["ws"])]

        def apart(k, v, w):
            out = sa.select_decode(p["q"], k, v, p["lengths"], p["groups"], p["n_active"], config=cfg.attn)
            idx, count = us.union_select(p["u"], w, p["live"], p["threshold"], cap, U, True, config=cfg.select)
            return out, idx, count

        want = jax.jit(apart)(*sets[0])
        for name, vcfg in variants.items():
            fn = apart if vcfg is None else (
                lambda k, v, w, vcfg=vcfg: au.select_decode_union(
                    p["q"], k, v, p["lengths"], p["groups"], p["n_active"], p["u"], w, p["live"], p["threshold"],
                    cap, None, None, U, True, "rn", vcfg))
            rec = dict(batch=B, variant=name, bytes=p["bytes"], kept=int(want[2]), capacity=cap)

            def check(fn=fn):
                got = jax.jit(fn)(*sets[0])
                if not all(bool(jnp.array_equal(a, b)) for a, b in zip(got, want)):
                    raise AssertionError("the shared launches differ from the ops apart")

            measure_into(rec, check, fn, sets, res, path)
            us_ = rec.get("us")
            print(f"B={B:3d} {name:18s} " + (f"{us_:7.2f} us {rec['TBps']:5.2f} TB/s {rec['us_per_kernel']}" if us_
                                             else rec.get("error", "ran (CPU)")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
