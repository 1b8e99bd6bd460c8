"""Where the gather kernels lose bandwidth at the OPT-6.7B B=32 decode shape (issue 10's missed 2.2x goal).

In the B=32 heads + MLP step `gather_up` and `gather_down` stream their weight rows at ~62 % of the measured
bandwidth, while our dense GEMV reads the full up projection at ~87 % (H100 profile,
benchmarks/results/raw_2026-12-07b_h100/call2_goals_opt.json). This probe separates the candidate causes on one
MLP layer (d=4096, N=16384, 6128 live neurons of 6144 slots, 32 rows), CUPTI kernel time per call with the
weights rotated past L2, every variant checked against the XLA reference first:
- the index order: ascending random (what `union_select` gives), contiguous (rows 0..n-1), unsorted;
- the grid: 32-neuron blocks give 192 programs on 132 SMs (1.45 per SM, uneven); 16-neuron blocks give 384;
- gather_up's re-reads of x: at 32 neurons x 128-wide k-steps each step loads as many x bytes as weight bytes;
  64 or 128 neurons per program (no split) halve or quarter that, with fewer programs than SMs;
- the same bytes through our dense GEMV (`gemv`, the rows 0..n-1 of the same matrix) and through XLA;
- time against bytes for the dense GEMV and gather_up (1/8 to all of the rows): each one's fixed cost per launch.

    PYTHONPATH=. python benchmarks/kernels/gather_probe.py --out $OUT
    PYTHONPATH=. python benchmarks/kernels/gather_probe.py --tiny --out /tmp/g   # code path on CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dense_gemv_triton as dense
from pallas_kernels import selective_gemm_triton as sg
from pallas_kernels import selective_gemm_xla as gx

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import rel  # noqa: E402


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def kernel_us(fn, sets) -> dict[str, float]:
    """Per-kernel CUPTI time per call (us) on the GPU; on CPU one run and an empty dict."""
    if not on_gpu():
        jax.block_until_ready(jax.jit(lambda s: [fn(*a) for a in s])(sets))
        return {}
    from profile_kernels import breakdown
    return breakdown(fn, sets)


def measure_into(rec: dict, check: Callable[[], None], fn, sets, res: dict, path: str) -> dict:
    """Fills `rec` with fn's per-kernel CUPTI time over the rotated sets once `check()` passes (it raises on a
    wrong result), or with the error of a variant the GPU refuses or that computes wrongly; appends it to
    res["rows"] and rewrites the JSON at `path`, so a call stopped at its time limit keeps what it has."""
    try:
        check()
        per = kernel_us(fn, sets)
        rec["us_per_kernel"] = per
        rec["us"] = sum(per.values()) if per else None
        rec["TBps"] = rec["bytes"] / rec["us"] / 1e6 if rec["us"] else None
    except Exception as e:  # noqa: BLE001 (a variant the GPU refuses: record it and go on)
        rec["error"] = repr(e)[:300]
    res["rows"].append(rec)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return rec


def launch_fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """A line through (bytes, us) points: the fixed cost per launch in us (intercept) and the rate at which the
    bytes stream in TB/s (1 / slope)."""
    slope, icpt = np.polyfit([b for b, _ in points], [u for _, u in points], 1)
    return {"fixed_us": float(icpt), "stream_TBps": float(1e-6 / slope)}


def up_variants(M: int, K: int, A: int) -> dict[str, sg.UpConfig]:
    base = sg.choose_up_config(M, K, A)
    rep = dataclasses.replace
    out = {"base": base,
           "a16": rep(base, block_a=16),
           "k256_st3": rep(base, block_k=min(256, K), num_stages=3),
           "st6": rep(base, num_stages=6),
           "w8": rep(base, num_warps=8),
           "a64_k64_split2": rep(base, block_a=64, block_k=64, num_stages=6, split_k=2),
           # every k-step of the default loads as many x bytes (from L2) as weight bytes: [32, 128] each, so the
           # 192 programs read x 192 times (50 MB, the weights' size). 64 or 128 neurons per program halve or
           # quarter that, with 96 or 48 programs (fewer than the SMs) and no split, so no float32 partials
           "a64_k256_nosplit": rep(base, block_a=64, block_k=min(256, K), num_stages=3, split_k=1),
           "a128_k128_nosplit": rep(base, block_a=128, block_k=128, num_stages=4, split_k=1)}
    return {k: v for k, v in out.items() if sg.up_smem(v) <= 227 * 1024}


def down_variants(M: int, D: int, A: int) -> dict[str, sg.DownConfig]:
    base = sg.choose_down_config(M, D, A)
    rep = dataclasses.replace
    out = {"base": base,
           "split_half": rep(base, split_j=max(2, base.split_j // 2)),
           "split_double": rep(base, split_j=base.split_j * 2),
           "j64_st4": rep(base, block_j=64, num_stages=4, split_j=base.split_j * 2),
           "w4": rep(base, num_warps=4)}
    return {k: v for k, v in out.items() if sg.down_smem(v) <= 227 * 1024}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on small shapes (interpret mode)")
    args = ap.parse_args()
    if args.tiny:
        M, K, N, n, A, R, dt = 4, 256, 512, 120, 128, 1, jnp.float32
    else:
        M, K, N, n, A, R, dt = 32, 4096, 16384, 6128, 6144, 6, jnp.bfloat16
    key = jax.random.key(0)
    ks = jax.random.split(key, 8)
    x = jax.random.normal(ks[0], (M, K), dt)
    h = jax.random.normal(ks[1], (M, A), dt)
    w_up = [(jax.random.normal(jax.random.fold_in(ks[2], r), (N, K), dt) * 0.02).astype(dt) for r in range(R)]
    w_dn = [(jax.random.normal(jax.random.fold_in(ks[3], r), (N, K), dt) * 0.02).astype(dt) for r in range(R)]
    perm_all = jax.random.permutation(ks[4], N).astype(jnp.int32)
    perm = perm_all[:n]
    pad = jnp.zeros((A - n,), jnp.int32)
    orders = {"sorted": jnp.concatenate([jnp.sort(perm), pad]),
              "contiguous": jnp.concatenate([jnp.arange(n, dtype=jnp.int32), pad]),
              "unsorted": jnp.concatenate([perm, pad])}
    n_act = jnp.int32(n)
    nbytes = n * K * 2
    res = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
           "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
           "shape": dict(M=M, K=K, N=N, n_active=n, slots=A, rotated_sets=R, bytes_per_call=nbytes), "rows": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gather_probe.json")

    def record(op, name, order, fn, sets, ref, nbytes=nbytes):
        rec = dict(op=op, variant=name, order=order, bytes=nbytes)

        def check():
            rec["rel_err"] = rel(jax.jit(fn)(*sets[0]), ref)
            if not rec["rel_err"] < 2e-2:
                raise AssertionError(f"wrong result: rel err {rec['rel_err']:.2e}")

        measure_into(rec, check, fn, sets, res, path)
        us = rec.get("us")
        print(f"{op:5s} {name:16s} {order:10s} " + (f"{us:7.2f} us {rec['TBps']:5.2f} TB/s" if us else
              rec.get("error", "ran (CPU)")), flush=True)

    for order, idx in orders.items():
        up_ref = gx.gather_up_xla(x, w_up[0], idx, n_act, None, "relu")
        dn_ref = gx.gather_down_xla(h, w_dn[0], idx, n_act, None)
        ups = sets_up = [(x, w, idx) for w in w_up]
        dns = [(h, w, idx) for w in w_dn]
        for name, cfg in up_variants(M, K, A).items():
            if order != "sorted" and name != "base":
                continue
            record("up", name, order, lambda x, w, i, cfg=cfg: sg.gather_up(x, w, i, n_act, None, "relu", config=cfg),
                   ups, up_ref)
        for name, cfg in down_variants(M, K, A).items():
            if order != "sorted" and name != "base":
                continue
            record("down", name, order, lambda h, w, i, cfg=cfg: sg.gather_down(h, w, i, n_act, None, config=cfg),
                   dns, dn_ref)
        del sets_up
    # the same bytes read contiguously by our dense GEMV and by XLA: rows 0..n-1
    up_ref = jax.nn.relu(jnp.dot(x, w_up[0][:n].T, preferred_element_type=jnp.float32)).astype(dt)
    ups = [(x, w[:n]) for w in w_up]  # sliced here: inside the timed function the slice would be a copy kernel
    gemv_cfg = dense.choose_gemv_config(M, K, n, "nk")
    record("up", "dense_gemv", "contiguous", lambda x, w: dense.gemv(x, w, None, "relu", "nk", config=gemv_cfg),
           ups, up_ref)
    like = dense.GemvConfig(32, 128, 1, 4, 4, block_m=dense.row_tile(M))
    record("up", "dense_gemv_32x128", "contiguous", lambda x, w: dense.gemv(x, w, None, "relu", "nk", config=like),
           ups, up_ref)
    record("up", "xla", "contiguous", lambda x, w: jax.nn.relu(jnp.dot(x, w.T, preferred_element_type=jnp.float32)
                                                               ).astype(dt), ups, up_ref)
    hn = h[:, :n]
    dn_ref = jnp.dot(hn, w_dn[0][:n], preferred_element_type=jnp.float32).astype(dt)
    dns = [(hn, w[:n]) for w in w_dn]
    record("down", "dense_gemv", "contiguous", lambda h, w: dense.gemv(h, w, None, None, "kn"), dns, dn_ref)
    record("down", "xla", "contiguous", lambda h, w: jnp.dot(h, w, preferred_element_type=jnp.float32
                                                             ).astype(dt), dns, dn_ref)
    # Time against bytes: the dense GEMV (rows 0..r-1) and gather_up (r ascending random rows) at four row counts.
    # A line through each gives its fixed cost per launch (the intercept) and its streaming rate (the slope): the
    # step's 30-50 MB kernels leave 4-9 us over their bytes, and this says how much of that any kernel pays.
    fits = {}
    for rows in (N // 8, N // 4, N // 2, N):
        rb = rows * K * 2
        ref = jax.nn.relu(jnp.dot(x, w_up[0][:rows].T, preferred_element_type=jnp.float32)).astype(dt)
        cfg = dense.choose_gemv_config(M, K, rows, "nk")
        record("up", f"sweep_dense_{rows}", "contiguous",
               lambda x, w, cfg=cfg: dense.gemv(x, w, None, "relu", "nk", config=cfg), [(x, w[:rows]) for w in w_up],
               ref, rb)
        slots = -(-rows // 64) * 64
        idx = jnp.concatenate([jnp.sort(perm_all[:rows]), jnp.zeros((slots - rows,), jnp.int32)])
        r_act = jnp.int32(rows)
        ref = gx.gather_up_xla(x, w_up[0], idx, r_act, None, "relu")
        record("up", f"sweep_gather_{rows}", "sorted",
               lambda x, w, i, r_act=r_act: sg.gather_up(x, w, i, r_act, None, "relu"), [(x, w, idx) for w in w_up],
               ref, rb)
    for kind in ("dense", "gather"):
        pts = [(r["bytes"], r["us"]) for r in res["rows"] if r["variant"].startswith(f"sweep_{kind}_") and r.get("us")]
        if len(pts) >= 2:
            fits[kind] = launch_fit(pts)
            print(f"fit {kind}: {fits[kind]['fixed_us']:.2f} us per launch + bytes at "
                  f"{fits[kind]['stream_TBps']:.2f} TB/s", flush=True)
    res["fits"] = fits
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
