"""A/B of decode-step code variants in one process, on the GPU (issue 10's small-batch work).

Each *variant* patches one code choice (module attributes, restored afterwards); the model and its
weights are built once per shape, every variant is compiled after `jax.clear_caches()`, and the rounds
interleave the variants so clock drift hits them alike. The `base` variant is the committed code.

    PYTHONPATH=. python benchmarks/decode/step_variants.py --out $OUT/v.json               # H200
    PYTHONPATH=. python benchmarks/decode/step_variants.py --points tiny-opt:1:32:dense,both \
        tiny-llama:1:32:dense,heads --rank 16 --steps 2 --repeats 2 --out /tmp/v.json      # CPU check

Printed last: a table of step time per (shape, B, selector variant, code variant) and the ratio to
`base`. JSON rows carry every repeat.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import dense_gemv, dense_gemv_triton, selective_attention_triton, unit_gemv_triton
from polar_jax.bench import decode_bench as db
from polar_jax.bench.shapes import SHAPES
from polar_jax.bench.synthetic import calibrate_union, paper_union, random_bundle, random_cache
from polar_jax.models import base, build_model, layers


@contextlib.contextmanager
def patched(*changes):
    """(object, attribute, value) triples set for the block and restored after it."""
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


def _old_qkv(self, x, gemv=None, units=None):
    """Attention.qkv before the fused launch: three GEMV calls, every query column."""
    lead = x.shape[:-1]
    out = []
    for w, b in ((self.q, self.q_bias), (self.k, self.k_bias), (self.v, self.v_bias)):
        out.append(layers.linear(x, w[...], layers._value(b), "kn", gemv).reshape(*lead, -1, self.head_dim))
    return tuple(out)


def _no_split_config(choose):
    def pick(M, K, N, layout, device=None):
        cfg = choose(M, K, N, layout, device)
        if layout == "kn" and cfg.split_k > 1:  # same program count, one partial: no epilogue kernel
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // cfg.split_k, split_k=1)
        return cfg
    return pick


def _min_chunk(chunk):
    choose = selective_attention_triton.choose_attn_config

    def pick(B, S, A, D, G=1, device=None):
        cfg = choose(B, S, A, D, G, device)
        if B > 4:
            return cfg
        splits = max(1, min(64, -(-S // chunk)))
        return dataclasses.replace(cfg, min_chunk=chunk, num_splits=splits)
    return pick


def _rows_split(split, block_n=32):
    choose = unit_gemv_triton.choose_rows_config

    def pick(width, N, slots=1, device=None):
        return dataclasses.replace(choose(width, N, slots, device), split_k=split, block_n=block_n)
    return pick


def _dense_out(self, heads, gemv=None, *, bias=True, units=None):
    return _committed_out(self, heads, gemv, bias=bias, units=None)


_committed_out = layers.Attention.out


def variants() -> dict:
    no_units = (base, "selected_units", lambda choice, step: None)
    return {
        "base": (),
        "old_qkv": ((layers.Attention, "qkv", _old_qkv), no_units),
        "no_unit_sel": (no_units,),
        "q_only": ((layers.Attention, "out", _dense_out),),
        "rows_s2": ((unit_gemv_triton, "choose_rows_config", _rows_split(2)),),
        "rows_s4": ((unit_gemv_triton, "choose_rows_config", _rows_split(4)),),
        "rows_bn64_s2": ((unit_gemv_triton, "choose_rows_config", _rows_split(2, 64)),),
        "kn_no_split": ((dense_gemv_triton, "choose_gemv_config", _no_split_config(dense_gemv_triton.choose_gemv_config)),),
        "chunk128": ((selective_attention_triton, "choose_attn_config", _min_chunk(128)),),
        "chunk64": ((selective_attention_triton, "choose_attn_config", _min_chunk(64)),),
        # the Pallas GEMV up to 16 rows: for the out-major MLP weights only, and for every projection
        "gemv_nk16": ((dense_gemv, "GEMV_MAX_M", {"nk": 16, "kn": 1}),),
        "gemv_b1_only": ((dense_gemv, "GEMV_MAX_M", {"nk": 1, "kn": 1}),),
        "gemv_all16": ((dense_gemv, "GEMV_MAX_M", {"nk": 16, "kn": 16}),),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["opt-6.7b:1:2048:dense,both", "llama2-7b:1:4096:dense,heads"],
                    help="shape:batch:context:selector variants")
    ap.add_argument("--code", nargs="+", default=list(variants()), help="code variants (first: the reference)")
    ap.add_argument("--attn-density", type=float, default=None, help="default: 0.3 for OPT, 0.5 otherwise")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=1024, help="MLP router rank")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    table = variants()
    rows = []
    for point in args.points:
        shape, batch, context, sels = point.split(":")
        batch, context = int(batch), int(context)
        cfg = SHAPES[shape]
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        graphdef, state = nnx.split(build_model(cfg, dtype=dtype))
        bundle = random_bundle(cfg, args.rank, dtype)
        density = args.attn_density or (0.3 if cfg.model_type == "opt" else 0.5)
        tokens = jnp.asarray(np.random.default_rng(batch).integers(0, cfg.vocab_size, batch), jnp.int32)
        cache = random_cache(cfg, batch, context + args.steps + 8, context, dtype)
        if cfg.relu_mlp:
            _, cache, inter = db.probe_step(graphdef, state, cache, tokens, None)
            cache = db._reset(cache, context)
            bundle = calibrate_union(bundle, np.asarray(inter["router_input"][:, :, 0], np.float32), batch,
                                     paper_union(batch))
        names = sels.split(",")
        sel_vs = db.build_variants(cfg, names, batch, context, bundle, density, dtype, None)
        runs = {}
        ref_logits = {}
        for code in args.code:
            jax.clear_caches()
            with patched(*table[code]):
                for v in sel_vs:
                    t0 = time.perf_counter()
                    fn = db.run_steps_on_device.lower(graphdef, state, cache, tokens, v.selector, args.steps,
                                                      v.gemv_impl).compile()
                    logits, cache = fn(state, db._reset(cache, context), tokens, v.selector)
                    lg = np.asarray(logits, np.float32)
                    ref_logits.setdefault(v.name, lg)
                    runs[(code, v.name)] = dict(compile_s=time.perf_counter() - t0, times=[], fn=fn,
                                                max_logit_diff=float(np.abs(lg - ref_logits[v.name]).max()))
        for _ in range(args.repeats):
            for (code, name), r in runs.items():
                v = next(v for v in sel_vs if v.name == name)
                c = db._reset(cache, context)
                t = time.perf_counter()
                logits, cache = r["fn"](state, c, tokens, v.selector)
                logits.block_until_ready()
                r["times"].append((time.perf_counter() - t) / args.steps)
        for (code, name), r in runs.items():
            base_t = statistics.median(runs[(args.code[0], name)]["times"])
            med = statistics.median(r["times"])
            rows.append(dict(shape=shape, batch=batch, context=context, selector=name, code=code, step_ms=1e3 * med,
                             times_ms=[1e3 * t for t in r["times"]], ratio_to_first=med / base_t,
                             compile_s=r["compile_s"], max_logit_diff_vs_first=r["max_logit_diff"]))
            print(f"{shape:10s} B={batch:3d} L={context:5d} {name:6s} {code:12s} {1e3 * med:8.3f} ms "
                  f"x{med / base_t:.3f} (logits diff {r['max_logit_diff']:.2e})", flush=True)
        del cache, graphdef, state
    meta = dict(device=str(jax.devices()[0].device_kind if hasattr(jax.devices()[0], "device_kind") else jax.devices()[0]),
                jax_version=jax.__version__, date=datetime.date.today().isoformat(),
                command="python benchmarks/decode/step_variants.py " + " ".join(sys.argv[1:]),
                xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
