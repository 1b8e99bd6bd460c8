"""GPU check + benchmark of the selective kernels (run on the lent H100 through the device tool).

    PYTHONPATH=.:.ref python benchmarks/kernels/bench_kernels.py --parts check,copy,attn --out $OUT

Order: correctness on the GPU first (fresh random inputs, Pallas vs XLA reference, memory pool
poisoned with NaN before each kernel), then timings. Our kernels and XLA are timed with CUPTI
(jax.experimental.mosaic.gpu.profiler.measure: sum of kernel durations, launch gaps excluded),
rotating among input sets larger than the 50 MB L2, median over iterations. The authors' Triton
kernels (.ref/HybridTensor, fetched from github susavlsh10/Polar-Sparsity, never committed) are
timed with triton.testing.do_bench (median; it clears the L2 before every run).
Everything goes to <out>/kernels_<part>.json as it is measured; a short table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk
import pallas_kernels.triton as pktri  # noqa: E402
from pallas_kernels import gpu_configs as gc  # noqa: E402
from pallas_kernels import selective_gemm_xla as gx  # noqa: E402
from pallas_kernels.activations import get_activation  # noqa: E402
from pallas_kernels.selective_attention_triton import choose_attn_config  # noqa: E402
from pallas_kernels.selective_attention_xla import dense_decode_xla, select_decode_xla  # noqa: E402
from pallas_kernels.selective_gemm_triton import choose_down_config, choose_up_config  # noqa: E402

DT = jnp.float16  # the authors' kernels are fp16-only: compare like with like
ROTATE_BYTES = 160e6  # > 3x the H100 L2 per rotation cycle
RESULTS: dict = {}
COPY_ELEMS = 512 * 1024 * 1024  # 1 GiB of fp16
# correctness cases: (M, K, N, A, n_active, activation) and (B, S, Hq, Hkv, D, window)
CHECK_GEMM = [(1, 4096, 16384, 1638, 1638, "relu"), (64, 4096, 16384, 8192, 5000, "gelu"),
              (256, 9216, 36864, 3000, 3000, "relu"), (5, 1000, 300, 77, 40, "silu"),
              (16, 5120, 13824, 700, 0, None)]
CHECK_ATTN = [(16, 2048, 32, 8, 128, None), (4, 8192, 32, 32, 128, None), (3, 1000, 28, 4, 128, 300),
              (64, 512, 32, 8, 64, None), (2, 4096, 40, 40, 96, 1000),
              # enough live slots for one split at run time: the direct-write path
              (256, 512, 32, 8, 128, None), (128, 1024, 32, 32, 128, 700)]
OUT = "."


def log(*a):
    print(*a, flush=True)


def save(part: str) -> None:
    with open(os.path.join(OUT, f"kernels_{part}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def cupti_ms(fn, sets, iters: int = 15) -> dict:
    """Median per-call kernel time (ms) of fn over rotating argument sets, by CUPTI."""
    from jax.experimental.mosaic.gpu import profiler

    R = len(sets)
    g = jax.jit(lambda all_sets: [fn(*s) for s in all_sets])
    if jax.devices()[0].platform != "gpu":  # --tiny dry runs on CPU: wall clock
        jax.block_until_ready(g(sets))
        t0 = time.perf_counter()
        jax.block_until_ready(g(sets))
        return {"ms": (time.perf_counter() - t0) * 1e3 / R, "sets": R, "n": 1}
    try:
        _, t = profiler.measure(g, iterations=iters)(sets)
    except TypeError:  # older/newer signature without iterations
        t = [profiler.measure(g)(sets)[1] for _ in range(iters)]
    t = t if isinstance(t, list) else [t]
    per = sorted(x / R for x in t if x is not None)
    if not per:
        return {"ms": float("nan")}
    return {"ms": statistics.median(per), "min": per[0], "max": per[-1], "sets": R, "n": len(per)}


def safe_ms(fn, sets, iters: int = 15) -> dict:
    """cupti_ms that records a failure (compile error, out of resources) instead of raising."""
    try:
        return cupti_ms(fn, sets, iters)
    except Exception as e:  # noqa: BLE001
        msg = repr(e)[:400]
        log("   FAILED:", msg)
        return {"ms": float("nan"), "error": msg}


def kv_cache(key, B, L, Hkv, D):
    """Random cache without > 2^32-element RNG calls: one random [L, Hkv, D] block, varied per
    sequence by a random scale and shift (fresh, non-zero, distinct per sequence)."""
    k1, k2, k3 = jax.random.split(key, 3)
    base = jax.random.normal(k1, (L, Hkv, D), DT)
    a = (1.0 + 0.1 * jax.random.normal(k2, (B, 1, 1, 1), DT)).astype(DT)
    b = (0.1 * jax.random.normal(k3, (B, 1, 1, 1), DT)).astype(DT)
    return jax.jit(lambda base, a, b: base[None] * a + b)(base, a, b)


def torch_ms(fn) -> dict:
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    return {"ms": float(ms)}


def n_sets(active_bytes: float, cap: int = 16) -> int:
    return int(max(1, min(cap, math.ceil(ROTATE_BYTES / max(active_bytes, 1)))))


def poison():
    """Fill and free a large block so the next allocations come back full of NaN."""
    x = jnp.full((min(256 * 1024 * 1024, COPY_ELEMS),), jnp.nan, jnp.float16)
    x.block_until_ready()
    del x


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------
# correctness on the GPU
# ------------------------------------------------------------------------------------------
def part_check(key) -> bool:
    ok = True
    res = []
    tol = {jnp.float16: 3e-3, jnp.bfloat16: 1.5e-2}
    for dt in (jnp.float16, jnp.bfloat16):
        for (M, K, N, A, n, act) in CHECK_GEMM:
            key, *ks = jax.random.split(key, 8)
            x = jax.random.normal(ks[0], (M, K), dt)
            w = (jax.random.normal(ks[1], (N, K), dt) * K**-0.5).astype(dt)
            wu = (jax.random.normal(ks[2], (N, K), dt) * K**-0.5).astype(dt)
            b = jax.random.normal(ks[3], (N,), dt)
            idx = jax.random.randint(ks[4], (A,), 0, N, jnp.int32)  # duplicates allowed
            h = jax.random.normal(ks[5], (M, A), dt)
            wd = (jax.random.normal(ks[6], (N, K), dt) * A**-0.5).astype(dt)
            nn = jnp.int32(n)
            for name, f_p, f_x in (
                ("up", lambda: pk.gather_up(x, w, idx, nn, b, act, impl="triton"),
                 lambda: gx.gather_up_xla(x, w, idx, nn, b, act)),
                ("gated", lambda: pk.gather_up_gated(x, w, wu, idx, nn, impl="triton"),
                 lambda: gx.gather_up_gated_xla(x, w, wu, idx, nn)),
                ("down", lambda: pk.gather_down(h, wd, idx, nn, b[:K] if N >= K else None,
                                                impl="triton"),
                 lambda: gx.gather_down_xla(h, wd, idx, nn, b[:K] if N >= K else None)),
            ):
                poison()
                got = jax.block_until_ready(f_p())
                want = f_x()
                e = rel(got, want)
                zeros_ok = name == "down" or not np.asarray(got[:, n:]).any()
                good = e < tol[dt] and zeros_ok
                ok &= good
                res.append(dict(op=name, dtype=str(jnp.dtype(dt)), M=M, K=K, N=N, A=A, n=n,
                                rel_err=e, zeros_ok=zeros_ok, ok=good))
                log(f"check {name:5s} {jnp.dtype(dt)} M={M} K={K} N={N} A={A} n={n}: "
                    f"rel={e:.2e} {'OK' if good else 'FAIL'}")
        for (B, S, Hq, Hkv, D, window) in CHECK_ATTN:
            key, *ks = jax.random.split(key, 7)
            q = jax.random.normal(ks[0], (B, Hq, D), dt)
            k = jax.random.normal(ks[1], (B, S, Hkv, D), dt)
            v = jax.random.normal(ks[2], (B, S, Hkv, D), dt)
            lengths = jax.random.randint(ks[3], (B,), 1, S + 1, jnp.int32).at[0].set(S)
            groups = jnp.argsort(jax.random.uniform(ks[4], (B, Hkv)), axis=1).astype(jnp.int32)
            n_act = jax.random.randint(ks[5], (B,), 0, Hkv + 1, jnp.int32).at[0].set(Hkv)
            poison()
            got = jax.block_until_ready(pk.select_decode(q, k, v, lengths, groups, n_act,
                                                         window=window, impl="triton"))
            want = select_decode_xla(q, k, v, lengths, groups, n_act, D**-0.5, window)
            e = rel(got, want)
            good = e < tol[dt]
            ok &= good
            res.append(dict(op="select_decode", dtype=str(jnp.dtype(dt)), B=B, S=S, Hq=Hq,
                            Hkv=Hkv, D=D, window=window, rel_err=e, ok=good))
            log(f"check attn {jnp.dtype(dt)} B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} w={window}: "
                f"rel={e:.2e} {'OK' if good else 'FAIL'}")
    RESULTS["check"] = {"all_ok": bool(ok), "cases": res}
    return ok


# ------------------------------------------------------------------------------------------
# copy bandwidth
# ------------------------------------------------------------------------------------------
def part_copy(key) -> None:
    x = jax.random.normal(key, (COPY_ELEMS,), jnp.float16)
    t = cupti_ms(lambda a: a + 1, [(x,)], iters=20)
    bw = 2 * x.nbytes / (t["ms"] * 1e-3)
    RESULTS["copy"] = {"bytes_rw": 2 * x.nbytes, **t, "TBps": bw / 1e12}
    log(f"copy: {t['ms']:.3f} ms -> {bw / 1e12:.2f} TB/s (read+write)")


# ------------------------------------------------------------------------------------------
# authors' kernels (torch/triton)
# ------------------------------------------------------------------------------------------
def authors():
    try:
        import types

        import torch  # noqa: F401
        # Their kernel files import helpers we do not carry (pandas/matplotlib utils, pytest).
        stub = types.ModuleType("HybridTensor.utils.utils")
        stub.sparse_index = stub.arg_parser = None
        sys.modules.setdefault("HybridTensor.utils", types.ModuleType("HybridTensor.utils"))
        sys.modules.setdefault("HybridTensor.utils.utils", stub)
        if "pytest" not in sys.modules:
            try:
                import pytest  # noqa: F401
            except ImportError:
                sys.modules["pytest"] = types.ModuleType("pytest")
        from HybridTensor.triton.gather_gemm_col import gather_matmul_col
        from HybridTensor.triton.gather_gemm_row import gather_matmul_row
        from HybridTensor.triton.select_attn_v1 import select_attn
        from HybridTensor.triton.select_gqa import select_gqa
        return dict(col=gather_matmul_col, row=gather_matmul_row, mha=select_attn, gqa=select_gqa)
    except Exception as e:  # noqa: BLE001
        RESULTS.setdefault("errors", []).append(f"authors import: {e!r}")
        log("authors' kernels unavailable:", repr(e))
        return None


def to_torch(x):
    import torch
    return torch.from_dlpack(x)


# ------------------------------------------------------------------------------------------
# tuning at a few shapes
# ------------------------------------------------------------------------------------------
def part_tune(key) -> None:
    """Every tiling variant at the tuning shapes: checked against the XLA reference on the GPU
    (relative error recorded; a wrong variant is marked and never chosen), then timed."""
    out = RESULTS.setdefault("tune", [])
    for heads, B, L, densities in gc.TUNE_ATTN:
        Hq, Hkv, D = gc.ATTN_HEADS[heads]
        kv_bytes = 2 * B * L * Hkv * D * 2
        sets = []
        for r in range(n_sets(kv_bytes, 8)):
            key, *ks = jax.random.split(key, 4)
            sets.append((jax.random.normal(ks[0], (B, Hq, D), DT), kv_cache(ks[1], B, L, Hkv, D),
                         kv_cache(ks[2], B, L, Hkv, D)))
        lengths = jnp.full((B,), L, jnp.int32)
        key, kg = jax.random.split(key)
        groups = jnp.argsort(jax.random.uniform(kg, (B, Hkv)), axis=1).astype(jnp.int32)
        for dens in densities:
            a = gc.active_count(dens, Hkv)
            n = jnp.full((B,), a, jnp.int32)
            want = select_decode_xla(*sets[0], lengths, groups[:, :a], n, D**-0.5, None)
            dyn_sets = [s + (lengths, groups, n) for s in sets]
            for cfg in gc.attn_variants(B, L, Hkv, D):
                f = lambda q, k, v, l, g, nn, cfg=cfg: pktri.select_decode(q, k, v, l, g, nn, config=cfg)
                err = rel(f(*dyn_sets[0]), want)
                t = safe_ms(f, dyn_sets)
                bw = kv_bytes * a / Hkv / (t["ms"] * 1e-3) / 1e12
                out.append(dict(op="attn", heads=heads, B=B, L=L, density=dens, rel_err=err,
                                cfg=dataclasses.asdict(cfg), **t, TBps=bw))
                log(f"tune attn {heads} B={B} L={L} d={dens} {cfg}: {t['ms']:.4f} ms "
                    f"{bw:.2f} TB/s rel={err:.1e}")
            save("tune")
        del sets
    for model, M, dens in gc.TUNE_GEMM:
        K, N, gated = gc.GEMM_MODELS[model]
        A = gc.active_count(dens, N)
        up_bytes = (2 if gated else 1) * A * K * 2
        down_bytes = A * K * 2
        sets = []
        for r in range(n_sets(up_bytes, 12)):
            key, *ks = jax.random.split(key, 6)
            sets.append((jax.random.normal(ks[0], (M, K), DT),
                         (jax.random.normal(ks[1], (N, K), DT) * 0.02).astype(DT),
                         (jax.random.normal(ks[4], (N, K), DT) * 0.02).astype(DT),
                         jax.random.permutation(ks[2], N)[:A].astype(jnp.int32),
                         jax.random.normal(ks[3], (M, A), DT)))
        n = jnp.int32(A)
        if gated:
            up_ref = lambda x, w, wu, i, h: gx.gather_up_gated_xla(x, w, wu, i, n)
        else:
            up_ref = lambda x, w, wu, i, h: gx.gather_up_xla(x, w, i, n, None, "relu")
        down_ref = lambda x, w, wu, i, h: gx.gather_down_xla(h, w, i, n, None)
        for op, variants, ref_fn, nbytes in (
                ("up", gc.up_variants(M, K, A, gated), up_ref, up_bytes),
                ("down", gc.down_variants(M, K, A), down_ref, down_bytes)):
            want = ref_fn(*sets[0])
            for cfg in variants:
                if op == "down":
                    f = lambda x, w, wu, i, h, cfg=cfg: pktri.gather_down(h, w, i, n, None, config=cfg)
                elif gated:
                    f = lambda x, w, wu, i, h, cfg=cfg: pktri.gather_up_gated(x, w, wu, i, n, config=cfg)
                else:
                    f = lambda x, w, wu, i, h, cfg=cfg: pktri.gather_up(x, w, i, n, None, "relu", config=cfg)
                try:
                    err = rel(f(*sets[0]), want)
                except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
                    err = float("nan")
                    log("   FAILED:", repr(e)[:300])
                t = safe_ms(f, sets) if np.isfinite(err) else {"ms": float("nan")}
                out.append(dict(op=op, model=model, M=M, density=dens, rel_err=err,
                                cfg=dataclasses.asdict(cfg), **t,
                                TBps=nbytes / (t["ms"] * 1e-3) / 1e12))
                log(f"tune {op} {model} M={M} d={dens} {cfg}: {t['ms']:.4f} ms "
                    f"{nbytes / (t['ms'] * 1e-3) / 1e12:.2f} TB/s rel={err:.1e}")
            save("tune")
        del sets


# ------------------------------------------------------------------------------------------
# attention sweep
# ------------------------------------------------------------------------------------------
def part_attn(key, auth, xla_gather: bool = True) -> None:
    rows = RESULTS.setdefault("attn", [])
    for heads, B, L, Hq, Hkv, D in gc.attn_sweep():
        kv_bytes = 2 * B * L * Hkv * D * 2
        R = n_sets(kv_bytes, 16)
        sets = []
        for r in range(R):
            key, *ks = jax.random.split(key, 4)
            sets.append((jax.random.normal(ks[0], (B, Hq, D), DT), kv_cache(ks[1], B, L, Hkv, D),
                         kv_cache(ks[2], B, L, Hkv, D)))
        lengths = jnp.full((B,), L, jnp.int32)
        scale = D**-0.5
        t0 = time.time()
        # lengths, groups and counts are arguments of the timed function, as in a decode step:
        # captured as constants, XLA would rebuild them with small kernels counted in the time.
        dense = safe_ms(lambda q, k, v, l: dense_decode_xla(q, k, v, l, scale),
                        [s + (lengths,) for s in sets])
        key, kg = jax.random.split(key)
        perm = jnp.argsort(jax.random.uniform(kg, (B, Hkv)), axis=1).astype(jnp.int32)
        for dens in gc.ATTN_DENSITIES:
            a = gc.active_count(dens, Hkv)
            n = jnp.full((B,), a, jnp.int32)
            dyn_sets = [s + (lengths, perm, n) for s in sets]
            row = dict(heads=heads, B=B, L=L, Hq=Hq, Hkv=Hkv, D=D, density=dens, groups=a,
                       kv_bytes=kv_bytes, active_bytes=kv_bytes * a / Hkv, sets=R,
                       dense_xla=dense["ms"])
            ours = safe_ms(lambda q, k, v, l, g, nn: pk.select_decode(q, k, v, l, g, nn,
                                                                       impl="triton"), dyn_sets)
            row["ours"] = ours["ms"]
            row["ours_spread"] = [ours.get("min"), ours.get("max")]
            if xla_gather and kv_bytes * (1 + a / Hkv) < 40e9:
                g_a = perm[:, :a]
                ref = lambda q, k, v, l, g, nn: select_decode_xla(q, k, v, l, g, nn, scale)
                row["xla_gather"] = safe_ms(ref, [s + (lengths, g_a, n) for s in sets])["ms"]
                # every timed point is also checked against the reference on the GPU
                row["rel_err"] = rel(pk.select_decode(*dyn_sets[0], impl="triton"),
                                     ref(*sets[0], lengths, g_a, n))
            if auth is not None:
                try:
                    q, k, v = (to_torch(t) for t in sets[0])
                    import torch
                    idx_t = to_torch(perm[:, :a]).contiguous()
                    if heads == "mha":
                        fn = lambda: auth["mha"](q.unsqueeze(1).unsqueeze(2), k.unsqueeze(2),
                                                 v.unsqueeze(2), scale, idx_t, L)
                    else:
                        fn = lambda: auth["gqa"](q.unsqueeze(1), k, v, scale, False, None, "bshd",
                                                 None, None, False, None, None, idx_t)
                    row["authors"] = torch_ms(fn)["ms"]
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    row["authors_error"] = repr(e)[:300]
            row["ours_TBps"] = row["active_bytes"] / (row["ours"] * 1e-3) / 1e12
            rows.append(row)
            log(f"attn {heads} B={B:3d} L={L:5d} d={dens:.1f} dense={dense['ms']:.4f} "
                f"ours={row['ours']:.4f} ({row['ours_TBps']:.2f} TB/s) "
                f"gather={row.get('xla_gather', float('nan')):.4f} "
                f"authors={row.get('authors', float('nan')):.4f}")
        log(f"  [{time.time() - t0:.1f}s]")
        del sets
        save("attn")


# ------------------------------------------------------------------------------------------
# MLP sweep
# ------------------------------------------------------------------------------------------
AUTHOR_GEMM = {("relu_d4096", M, d) for M in gc.GEMM_MS for d in (0.1, 0.5)} | {
    ("relu_d9216", 64, 0.1), ("relu_d9216", 64, 0.5)}


def part_gemm(key, auth) -> None:
    rows = RESULTS.setdefault("gemm", [])
    relu = get_activation("relu")
    silu = get_activation("silu")
    for model, (K, N, gated) in gc.GEMM_MODELS.items():
        full_bytes = (3 if gated else 2) * N * K * 2
        R_max = n_sets(full_bytes * 0.05, 12)
        wsets = []
        for r in range(R_max):
            key, *ks = jax.random.split(key, 4)
            wsets.append(tuple((jax.random.normal(k_, (N, K), DT) * 0.02).astype(DT)
                               for k_ in ks[: (3 if gated else 2)]))
        for M in gc.GEMM_MS:
            key, kx = jax.random.split(key)
            x = jax.random.normal(kx, (M, K), DT)
            # dense MLP: up (+gate) with activation, then down, over the whole weights
            R_d = min(R_max, n_sets(full_bytes))
            if gated:
                dense_up = lambda x, wg, wu, wd: (silu(jnp.dot(x, wg.T, preferred_element_type=jnp.float32))
                                                  * jnp.dot(x, wu.T, preferred_element_type=jnp.float32)).astype(DT)
                dense_down = lambda hh, wg, wu, wd: jnp.dot(hh, wd, preferred_element_type=jnp.float32).astype(DT)
            else:
                dense_up = lambda x, wu, wd: relu(jnp.dot(x, wu.T, preferred_element_type=jnp.float32)).astype(DT)
                dense_down = lambda hh, wu, wd: jnp.dot(hh, wd, preferred_element_type=jnp.float32).astype(DT)
            hfull = jax.random.normal(kx, (M, N), DT)
            t_du = safe_ms(dense_up, [(x,) + w for w in wsets[:R_d]])["ms"]
            t_dd = safe_ms(dense_down, [(hfull,) + w for w in wsets[:R_d]])["ms"]
            for dens in gc.GEMM_DENSITIES:
                A = gc.active_count(dens, N)
                act_bytes = (3 if gated else 2) * A * K * 2
                R = min(R_max, n_sets(act_bytes))
                sets = []
                for r in range(R):
                    key, ki, kh = jax.random.split(key, 3)
                    idx = jax.random.permutation(ki, N)[:A].astype(jnp.int32)
                    sets.append((x, jax.random.normal(kh, (M, A), DT), idx) + wsets[r])
                n = jnp.int32(A)
                row = dict(model=model, M=M, K=K, N=N, gated=gated, density=dens, A=A,
                           active_bytes=act_bytes, sets=R, dense_up=t_du, dense_down=t_dd,
                           dense=t_du + t_dd,
                           up_cfg=dataclasses.asdict(choose_up_config(M, K, A, gated)),
                           down_cfg=dataclasses.asdict(choose_down_config(M, K, A)))
                if gated:
                    up = lambda x, h, i, wg, wu, wd: pk.gather_up_gated(x, wg, wu, i, n, impl="triton")
                    xup = lambda x, h, i, wg, wu, wd: gx.gather_up_gated_xla(x, wg, wu, i, n)
                else:
                    up = lambda x, h, i, wu, wd: pk.gather_up(x, wu, i, n, None, "relu", impl="triton")
                    xup = lambda x, h, i, wu, wd: gx.gather_up_xla(x, wu, i, n, None, "relu")
                down = lambda x, h, i, *w: pk.gather_down(h, w[-1], i, n, None, impl="triton")
                xdown = lambda x, h, i, *w: gx.gather_down_xla(h, w[-1], i, n, None)
                # every timed configuration is also checked on the GPU, on this point's inputs
                row["rel_err_up"] = rel(up(*sets[0]), xup(*sets[0]))
                row["rel_err_down"] = rel(down(*sets[0]), xdown(*sets[0]))
                row["ours_up"] = safe_ms(up, sets)["ms"]
                row["ours_down"] = safe_ms(down, sets)["ms"]
                row["ours"] = row["ours_up"] + row["ours_down"]
                row["xla_gather"] = safe_ms(xup, sets)["ms"] + safe_ms(xdown, sets)["ms"]
                row["ours_TBps"] = act_bytes / (row["ours"] * 1e-3) / 1e12
                if auth is not None and (model, M, dens) in AUTHOR_GEMM:
                    try:
                        xt = to_torch(x)
                        w1, w2 = (to_torch(w) for w in wsets[0])
                        it = to_torch(sets[0][2])
                        ht = auth["col"](xt, w1, it, activations="relu")
                        row["authors_up"] = torch_ms(lambda: auth["col"](xt, w1, it, activations="relu"))["ms"]
                        row["authors_down"] = torch_ms(lambda: auth["row"](ht, w2, it))["ms"]
                        row["authors"] = row["authors_up"] + row["authors_down"]
                    except Exception as e:  # noqa: BLE001
                        row["authors_error"] = repr(e)[:300]
                rows.append(row)
                log(f"mlp {model} M={M:3d} d={dens:.2f} dense={row['dense']:.4f} "
                    f"ours={row['ours']:.4f} (up {row['ours_up']:.4f} down {row['ours_down']:.4f}, "
                    f"{row['ours_TBps']:.2f} TB/s) gather={row['xla_gather']:.4f} "
                    f"authors={row.get('authors', float('nan')):.4f} "
                    f"rel={max(row['rel_err_up'], row['rel_err_down']):.1e}")
                del sets
            save("gemm")
        del wsets


def _make_tiny() -> None:
    global ROTATE_BYTES, CHECK_GEMM, CHECK_ATTN
    gc.GEMM_MODELS = {"relu_d4096": (256, 512, False), "swiglu_4096_11008": (128, 300, True)}
    gc.GEMM_MS, gc.GEMM_DENSITIES = (1, 16), (0.1, 1.0)
    gc.ATTN_HEADS = {"mha": (4, 4, 64), "gqa": (8, 2, 64)}
    gc.ATTN_BS, gc.ATTN_LS, gc.ATTN_DENSITIES = (2,), (300,), (1.0, 0.5)
    gc.TUNE_GEMM = [("relu_d4096", 1, 0.1), ("swiglu_4096_11008", 16, 1.0)]
    gc.TUNE_ATTN = [("gqa", 2, 300, (0.5,))]
    CHECK_GEMM = [(3, 256, 500, 70, 33, "relu")]
    CHECK_ATTN = [(2, 300, 8, 2, 64, None)]
    ROTATE_BYTES = 1e5
    globals()["COPY_ELEMS"] = 1 << 16


def main() -> int:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="check,copy,attn,gemm")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-authors", action="store_true")
    ap.add_argument("--models", default="", help="comma-separated subset of the MLP models")
    ap.add_argument("--heads", default="", help="comma-separated subset of the attention heads")
    ap.add_argument("--bs", default="", help="comma-separated subset of the attention batch sizes")
    ap.add_argument("--ms", default="", help="comma-separated subset of the MLP batch sizes M")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run of every code path")
    args = ap.parse_args()
    if args.tiny:
        _make_tiny()
    if args.models:
        gc.GEMM_MODELS = {m: gc.GEMM_MODELS[m] for m in args.models.split(",")}
    if args.heads:
        gc.ATTN_HEADS = {h: gc.ATTN_HEADS[h] for h in args.heads.split(",")}
    if args.ms:
        gc.GEMM_MS = tuple(int(m) for m in args.ms.split(","))
    if args.bs:
        gc.ATTN_BS = tuple(int(b) for b in args.bs.split(","))
    OUT = args.out
    parts = args.parts.split(",")
    tag = "_".join(parts)
    dev = jax.devices()[0]
    RESULTS["meta"] = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           command=" ".join([sys.executable] + sys.argv), dtype=str(jnp.dtype(DT)),
                           impl_auto=pk.resolve_impl("auto"))
    log(RESULTS["meta"])
    key = jax.random.PRNGKey(int(time.time()))
    auth = None if args.no_authors or not ({"attn", "gemm"} & set(parts)) else authors()
    rc = 0
    for p in parts:
        t0 = time.time()
        try:
            if p == "check":
                if not part_check(key):
                    log("CORRECTNESS FAILED: timings skipped")
                    save(tag)
                    return 1
            elif p == "copy":
                part_copy(key)
            elif p == "tune":
                part_tune(key)
            elif p == "attn":
                part_attn(key, auth)
            elif p == "gemm":
                part_gemm(key, auth)
        except Exception:  # noqa: BLE001
            RESULTS.setdefault("errors", []).append(traceback.format_exc()[-3000:])
            log(traceback.format_exc())
            rc = 2
        log(f"== part {p}: {time.time() - t0:.1f}s")
        save(tag)
    return rc


if __name__ == "__main__":
    sys.exit(main())
