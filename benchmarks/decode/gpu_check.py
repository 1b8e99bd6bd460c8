"""GPU checks of the sparse decode path at real widths (run through the device tool before timing).

1. `union_select` (Pallas Triton) equals its XLA reference at paper-sized routers (d=4096, r=1024,
   N=16384, B in 1/32/64), fresh random inputs, and its CUPTI time next to the XLA composition's.
2. The decode step with selections (heads, MLP, both; Triton kernels) matches the same step through the
   XLA references, on a 2-layer model of OPT-6.7B / LLaMA-2-7B width with a random cache.

    PYTHONPATH=. python benchmarks/decode/gpu_check.py --out $OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as pk
from polar_jax.bench.shapes import SHAPES
from polar_jax.bench.synthetic import calibrate_union, random_bundle, random_cache
from polar_jax.bench.decode_bench import probe_step
from polar_jax.decode import decode_step
from polar_jax.models import build_model
from polar_jax.routers.sparsify import router_selector


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cupti_us(fn, sets, iters: int = 20) -> float:
    from jax.experimental.mosaic.gpu import profiler

    g = jax.jit(lambda s: [fn(*a) for a in s])
    _, t = profiler.measure(g, iterations=iters)(sets)
    t = t if isinstance(t, list) else [t]
    return statistics.median(t) * 1e3 / len(sets)


def check_union(report: dict) -> bool:
    ok = True
    key = jax.random.key(11)
    for B in (1, 32, 64):
        sets = []
        for i in range(4):
            key, k1, k2 = jax.random.split(key, 3)
            u = jax.random.normal(k1, (B, 1024), jnp.bfloat16)
            w = (jax.random.normal(k2, (1024, 16384), jnp.float32) * 1024**-0.5).astype(jnp.bfloat16)
            live = jnp.arange(B) < max(1, B - 3)
            sets.append((u, w, live, jnp.float32(2.0 + 0.3 * np.log2(B))))
        cap = 16384
        for s in sets[:2]:
            a = pk.union_select(*s, cap, impl="triton")
            b = pk.union_select(*s, cap, impl="xla")
            n_a, n_b = int(a[1]), int(b[1])
            # bf16 products summed in a different order can flip neurons sitting on the threshold
            flips = len(set(np.asarray(a[0][:n_a]).tolist()) ^ set(np.asarray(b[0][:n_b]).tolist()))
            good = flips <= max(2, n_b // 500) and bool(np.all(np.diff(np.asarray(a[0][:n_a])) > 0))
            ok &= good
            report.setdefault("union_select", []).append({"B": B, "count_triton": n_a, "count_xla": n_b,
                                                          "flips": flips, "ok": good})
        t_tri = cupti_us(lambda u, w, l, t: pk.union_select(u, w, l, t, cap, impl="triton"), sets)
        t_xla = cupti_us(lambda u, w, l, t: pk.union_select(u, w, l, t, cap, impl="xla"), sets)
        t_topk = cupti_us(lambda u, w, l, t: jax.lax.top_k(jnp.sum(jax.nn.relu(jnp.dot(
            u, w, preferred_element_type=jnp.float32)), 0), 6144)[1], sets)
        report.setdefault("union_select_us", []).append({"B": B, "triton": t_tri, "xla": t_xla,
                                                         "xla_matmul_topk": t_topk})
        print(f"union_select B={B}: triton {t_tri:.1f} us, xla {t_xla:.1f} us, matmul+top_k {t_topk:.1f} us",
              flush=True)
    return ok


def check_step(report: dict) -> bool:
    ok = True
    for shape, attn_density in (("opt-6.7b", 0.3), ("llama2-7b", 0.5)):
        cfg = dataclasses.replace(SHAPES[shape], num_layers=2)
        model = build_model(cfg, dtype=jnp.bfloat16, seed=3)
        graphdef, state = nnx.split(model)
        B, ctx = 8, 700
        bundle = random_bundle(cfg, 1024 if cfg.relu_mlp else 0, jnp.bfloat16)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, B), jnp.int32)
        cache = random_cache(cfg, B, ctx + 16, ctx, jnp.bfloat16)
        if cfg.relu_mlp:
            _, cache, inter = probe_step(graphdef, state, cache, tokens, None)
            bundle = calibrate_union(bundle, np.asarray(inter["router_input"][:, :, 0], np.float32), B, 0.2)
        parts = [(True, False), (False, True), (True, True)] if cfg.relu_mlp else [(True, False)]
        for attn, mlp in parts:
            sel = router_selector(bundle, attn_density=attn_density, mlp_recall=0.99 if mlp else None, attn=attn,
                                  mlp=mlp, dtype=jnp.bfloat16)
            out = {}
            for impl in ("triton", "xla"):
                c = dataclasses.replace(cache, lengths=jnp.full((B,), ctx, jnp.int32))
                c = jax.tree.map(jnp.copy, c)
                logits, _ = decode_step(graphdef, state, c, tokens, sel, impl, impl)
                out[impl] = np.asarray(logits.astype(jnp.float32))
            err = rel(out["triton"], out["xla"])
            good = err < 2e-2
            ok &= good
            report.setdefault("decode_step", []).append({"shape": shape, "attn": attn, "mlp": mlp, "rel_err": err,
                                                         "ok": good})
            print(f"decode step {shape} attn={attn} mlp={mlp}: triton vs xla rel err {err:.2e}", flush=True)
        del model, cache
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    report = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "command": "python benchmarks/decode/gpu_check.py " + " ".join(sys.argv[1:])}
    ok = check_union(report) & check_step(report)
    report["ok"] = ok
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("GPU CHECK", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
