"""Diagnosis of the decode step on the GPU (issue 10): where a step's time goes, before optimising.

Collects, for a few (shape, batch) points of the *current* decode step:
- wall-clock step time over back-to-back donated steps (median of repeats);
- per-kernel CUPTI records of 4 consecutive donated steps (kernel name, duration, launch order);
- the optimised HLO of the step (to map kernel names to model code offline);
and CUPTI microbenchmarks of the selection primitives (router matmuls, top_k, argsort, threshold +
stream compaction) and of the weight GEMVs at M = 1 and 32 (XLA layouts, fused QKV, our gather
kernels at full density), with weights rotated past the 60 MB L2.

    PYTHONPATH=. python benchmarks/decode/diagnose_step.py --out $OUT          # H200
    PYTHONPATH=. python benchmarks/decode/diagnose_step.py --tiny --out /tmp/d  # code path on CPU

Everything lands in <out>/diag.json (+ HLO texts in <out>/diag_hlo.tar.gz); a table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import io
import json
import os
import statistics
import sys
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.bench.decode_bench import SHAPES, random_cache
from polar_jax.config import ModelConfig
from polar_jax.decode import decode_step, split_model
from polar_jax.models import build_model
from polar_jax.bench.synthetic import calibrate_union, gaussian_router_inputs, random_bundle
from polar_jax.routers.sparsify import RouterSelector, router_selector

OPT_6_7B = ModelConfig(
    model_type="opt", vocab_size=50272, hidden_size=4096, intermediate_size=16384, num_layers=32,
    num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=8448, dtype="bfloat16",
    activation="relu", tie_word_embeddings=True, word_embed_proj_dim=4096, enable_bias=True,
)
TINY_OPT = dataclasses.replace(OPT_6_7B, vocab_size=512, hidden_size=64, intermediate_size=256,
                               num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, dtype="float32")
RESULTS: dict = {"steps": [], "micro": []}


def log(*a) -> None:
    print(*a, flush=True)


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


class Cupti:
    """Kernel records (name, ms) of everything launched inside the block (donation-safe: unlike
    profiler.measure, it does not call the function again)."""

    def __enter__(self):
        from jax.experimental.mosaic.gpu import profiler

        self.ext = profiler.mosaic_gpu_lib._mosaic_gpu_ext if on_gpu() else None
        if self.ext is not None:
            self.ext._cupti_init()
        return self

    def __exit__(self, *exc):
        self.records = self.ext._cupti_get_timings(True) if self.ext is not None else []
        return False


def random_selector(cfg: ModelConfig, batch: int, rank: int, attn_density: float, mlp_density: float,
                    router_dtype) -> RouterSelector:
    """A RouterSelector with random weights of the paper's shapes (d -> H with bias; d -> rank -> N), its MLP
    thresholds calibrated to keep `mlp_density` of the neurons for Gaussian router inputs (the benchmark's
    `polar_jax.bench.synthetic` bundles)."""
    bundle = random_bundle(cfg, rank, router_dtype)
    mlp = mlp_density < 1.0
    if mlp:
        x = gaussian_router_inputs(cfg, batch)
        bundle = calibrate_union(bundle, x, batch, mlp_density)
    return router_selector(bundle, attn_density=attn_density, mlp_recall=0.99 if mlp else None,
                           attn=attn_density < 1.0, mlp=mlp, dtype=router_dtype)


def time_and_profile(name: str, model, batch: int, context: int, selector, steps: int, repeats: int,
                     hlo: dict) -> None:
    cfg = model.config
    graphdef, state = split_model(model)
    cache = random_cache(cfg, batch, context + steps * (repeats + 3) + 16, context, model.dtype)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, batch), jnp.int32)
    t0 = time.perf_counter()
    compiled = decode_step.lower(graphdef, state, cache, tokens, selector).compile()
    compile_s = time.perf_counter() - t0
    hlo[name] = compiled.as_text()
    logits, cache = decode_step(graphdef, state, cache, tokens, selector)
    t_end = time.perf_counter() + 1.0
    while time.perf_counter() < t_end:  # clocks up
        logits, cache = decode_step(graphdef, state, cache, tokens, selector)
        logits.block_until_ready()
    per = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            logits, cache = decode_step(graphdef, state, cache, tokens, selector)
        logits.block_until_ready()
        per.append((time.perf_counter() - t) / steps * 1e3)
    n_prof = 4
    with Cupti() as c:
        for _ in range(n_prof):
            logits, cache = decode_step(graphdef, state, cache, tokens, selector)
        logits.block_until_ready()
    recs = [(str(k), float(ms)) for k, ms in c.records]
    kernel_ms = sum(ms for _, ms in recs) / n_prof if recs else float("nan")
    assert bool(jnp.all(jnp.isfinite(logits))), "non-finite logits"
    row = {"name": name, "batch": batch, "context": context, "compile_s": compile_s,
           "step_ms": statistics.median(per), "step_ms_all": per, "kernel_ms_per_step": kernel_ms,
           "kernels_per_step": len(recs) / n_prof, "records": recs}
    RESULTS["steps"].append(row)
    log(f"{name:34s} B={batch:3d} step {row['step_ms']:7.3f} ms (all {[round(p, 3) for p in per]}) "
        f"kernels {kernel_ms:7.3f} ms in {row['kernels_per_step']:.0f} launches, compile {compile_s:.1f}s")
    del cache


def micro(name: str, fn, sets, iters: int = 20) -> None:
    """Median CUPTI time per call (us) of fn over rotating argument sets."""
    from jax.experimental.mosaic.gpu import profiler

    g = jax.jit(lambda s: [fn(*a) for a in s])
    if not on_gpu():
        jax.block_until_ready(g(sets))
        RESULTS["micro"].append({"name": name, "us": float("nan")})
        return
    _, t = profiler.measure(g, iterations=iters)(sets)
    t = t if isinstance(t, list) else [t]
    us = statistics.median(t) * 1e3 / len(sets)
    RESULTS["micro"].append({"name": name, "us": us, "sets": len(sets)})
    log(f"  {name:60s} {us:9.2f} us")


def micro_suite(d: int, n: int, batches: tuple[int, ...], tiny: bool) -> None:
    import pallas_kernels as pk

    key = jax.random.key(3)
    bf = jnp.bfloat16
    R = 1 if tiny else 4
    for B in batches:
        key, *ks = jax.random.split(key, 8)
        xs = [jax.random.normal(jax.random.fold_in(ks[0], i), (B, d), bf) for i in range(R)]
        for rank in (1024, 128):
            for dt in (jnp.float32, bf):
                sets = [(x.astype(dt), jax.random.normal(jax.random.fold_in(ks[1], i), (d, rank), dt),
                         jax.random.normal(jax.random.fold_in(ks[2], i), (rank, n), dt)) for i, x in enumerate(xs)]
                micro(f"router d->{rank}->{n} {jnp.dtype(dt).name} B={B}",
                      lambda x, a, b: jnp.dot(jnp.dot(x, a, preferred_element_type=jnp.float32).astype(a.dtype), b,
                                              preferred_element_type=jnp.float32), sets)
        logits = [(jax.random.normal(jax.random.fold_in(ks[3], i), (B, n), jnp.float32),) for i in range(R)]
        for dens in (0.075, 0.374):
            k = int(dens * n)
            micro(f"top_k(sum relu) N={n} k={k} B={B}",
                  lambda l, k=k: jax.lax.top_k(jnp.sum(jax.nn.relu(l), 0), k)[1], logits)
        micro(f"argsort N={n} B={B}", lambda l: jnp.argsort(-jnp.sum(jax.nn.relu(l), 0)), logits)
        t = 1.5
        micro(f"threshold max_b>t + nonzero(size=N) B={B}",
              lambda l: jnp.nonzero(jnp.max(l, 0) > t, size=n, fill_value=0)[0], logits)

        def compact(l):
            m = jnp.max(l, 0) > t
            pos = jnp.cumsum(m.astype(jnp.int32)) - 1
            idx = jnp.zeros((n,), jnp.int32).at[jnp.where(m, pos, n)].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
            return idx, pos[-1] + 1

        micro(f"threshold max_b>t + cumsum scatter B={B}", compact, logits)
        hl = [(jax.random.normal(jax.random.fold_in(ks[4], i), (B, 32), jnp.float32),) for i in range(R)]
        micro(f"heads top_k [B,32] k=10 B={B}", lambda l: jax.lax.top_k(l, 10)[1], hl)
        # weight GEMVs
        Rw = 1 if tiny else 6
        for rows, cols, label in ((d, d, "x@W[d,d] (in,out)"), (d, 3 * d, "x@W[d,3d] fused qkv"),
                                  (d, n, "x@W[d,N] (in,out)")):
            sets = [(xs[i % R], jax.random.normal(jax.random.fold_in(ks[5], i), (rows, cols), bf)) for i in range(Rw)]
            micro(f"{label} B={B}", lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(bf), sets)
        sets = [(xs[i % R], jax.random.normal(jax.random.fold_in(ks[6], i), (n, d), bf)) for i in range(Rw)]
        micro(f"einsum nd (neuron-major up) B={B}",
              lambda x, w: jnp.einsum("bd,nd->bn", x, w, preferred_element_type=jnp.float32).astype(bf), sets)
        ident = jnp.arange(n, dtype=jnp.int32)
        if on_gpu() or tiny:
            impl = "pallas"
            micro(f"gather_up identity full N B={B}",
                  lambda x, w: pk.gather_up(x, w, ident, jnp.int32(n), None, "relu", impl=impl), sets)
            hsets = [(jax.random.normal(jax.random.fold_in(ks[6], 100 + i), (B, n), bf), w) for i, (_, w) in enumerate(sets)]
            micro(f"gather_down identity full N B={B}",
                  lambda h, w: pk.gather_down(h, w, ident, jnp.int32(n), None, impl=impl), hsets)
            micro(f"dense down h@W[N,d] B={B}",
                  lambda h, w: jnp.dot(h, w, preferred_element_type=jnp.float32).astype(bf), hsets)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--parts", default="steps,micro")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--shapes", default="opt-6.7b,llama2-7b")
    ap.add_argument("--variants", default="dense,heads.3+mlp r1024 f32,mlp r1024 f32,heads.3")
    args = ap.parse_args()
    RESULTS.update(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                   date=datetime.date.today().isoformat(),
                   command=" ".join(["python", "benchmarks/decode/diagnose_step.py", *sys.argv[1:]]),
                   xla_flags=os.environ.get("XLA_FLAGS", ""))
    batches = tuple(int(b) for b in args.batches.split(","))
    hlo: dict[str, str] = {}
    parts = args.parts.split(",")
    try:
        if "steps" in parts:
            known = {"opt-6.7b": OPT_6_7B, "llama2-7b": SHAPES["llama2-7b"]}
            shapes = [("tiny-opt", TINY_OPT)] if args.tiny else [(s, known[s]) for s in args.shapes.split(",")]
            context = 64 if args.tiny else 2048
            steps, repeats = (2, 2) if args.tiny else (20, 5)
            for sname, cfg in shapes:
                dtype = jnp.float32 if args.tiny else jnp.bfloat16
                model = build_model(cfg, dtype=dtype)
                for B in batches:
                    variants = args.variants.split(",")
                    if "dense" in variants:
                        time_and_profile(f"{sname} dense", model, B, context, None, steps, repeats, hlo)
                    if cfg.family == "opt":
                        mlp = 0.075 if B == 1 else 0.374
                        for rank, rdt, attn, mlpd, tag in ((1024, jnp.float32, 0.3, mlp, "heads.3+mlp r1024 f32"),
                                                           (1024, jnp.float32, 1.0, mlp, "mlp r1024 f32"),
                                                           (1024, jnp.float32, 0.3, 1.0, "heads.3")):
                            if tag not in variants:
                                continue
                            sel = random_selector(cfg, B, rank, attn, mlpd, rdt)
                            time_and_profile(f"{sname} {tag}", model, B, context, sel, steps, repeats, hlo)
                del model
        if "micro" in parts:
            d, n = (64, 256) if args.tiny else (4096, 16384)
            micro_suite(d, n, batches, args.tiny)
    finally:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "diag.json"), "w") as f:
            json.dump(RESULTS, f)
        with tarfile.open(os.path.join(args.out, "diag_hlo.tar.gz"), "w:gz") as tar:
            for name, text in hlo.items():
                data = text.encode()
                info = tarfile.TarInfo(name.replace(" ", "_").replace("/", "_") + ".hlo.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    log("\nsummary")
    for r in RESULTS["steps"]:
        log(f"{r['name']:34s} B={r['batch']:3d} {r['step_ms']:8.3f} ms  kernels {r['kernel_ms_per_step']:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
