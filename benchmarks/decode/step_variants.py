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
import importlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import (attention_union_triton, dense_gemv, dense_gemv_triton, selective_attention_triton,
                            selective_gemm_triton, union_select_triton, unit_gemv_triton)
from polar_jax.bench import decode_bench as db
from polar_jax import selection
from polar_jax.routers import sparsify

row_norm_mod = importlib.import_module("pallas_kernels.row_norm")  # the package exports a function of that name
kv_append_mod = importlib.import_module("pallas_kernels.kv_append")
from polar_jax.bench.launches import launches_in
from polar_jax.bench.shapes import SHAPES
from polar_jax.graph import split as split_graph
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


def _old_qkv(self, x, gemv=None, units=None, first=None):
    """Attention.qkv before the fused launch: three GEMV calls, every query column (and a routers' product asked
    for by `first` as XLA's einsum)."""
    lead = x.shape[:-1]
    out = []
    for w, b in ((self.q, self.q_bias), (self.k, self.k_bias), (self.v, self.v_bias)):
        out.append(layers.linear(x, w[...], layers._value(b), "kn", gemv).reshape(*lead, -1, self.head_dim))
    if first is not None:
        out.append(jnp.einsum("...d,nd->...n", x.astype(first.dtype), first, preferred_element_type=jnp.float32))
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


def _small_batch_attn(**fields):
    """select_decode's tiling with `fields` replaced at B <= 4 (e.g. deeper pipelining of the key blocks)."""
    choose = selective_attention_triton.choose_attn_config

    def pick(B, S, A, D, G=1, device=None):
        cfg = choose(B, S, A, D, G, device)
        return dataclasses.replace(cfg, **fields) if B <= 4 else cfg
    return pick


def _rows_split(split, block_n=32):
    choose = unit_gemv_triton.choose_rows_config

    def pick(unit_width, N, slots=1, device=None, rows=1):
        return dataclasses.replace(choose(unit_width, N, slots, device, rows), split_k=split, block_n=block_n)
    return pick


def _dense_out(self, heads, gemv=None, *, bias=True, units=None, split_sum=False):
    return _committed_out(self, heads, gemv, bias=bias, units=None, split_sum=split_sum)


_committed_out = layers.Attention.out


def _multi(block_n=None, stages=None, block_k=None):
    choose = unit_gemv_triton.choose_multi_config

    def pick(K, columns, device=None, rows=1):
        cfg = choose(K, columns, device, rows)
        return dataclasses.replace(cfg, block_n=block_n or cfg.block_n, num_stages=stages or cfg.num_stages,
                                   block_k=block_k or cfg.block_k)
    return pick


def _gemv_stages(stages):
    choose = dense_gemv_triton.choose_gemv_config

    def pick(M, K, N, layout, device=None):
        return dataclasses.replace(choose(M, K, N, layout, device), num_stages=stages)
    return pick


def _rows_stages(stages):
    choose = unit_gemv_triton.choose_rows_config

    def pick(unit_width, N, slots=1, device=None, rows=1):
        return dataclasses.replace(choose(unit_width, N, slots, device, rows), num_stages=stages)
    return pick


def _attn_target(target):
    choose = selective_attention_triton.choose_attn_config

    def pick(B, S, A, D, G=1, device=None):
        cfg = choose(B, S, A, D, G, device)
        return cfg if B < 8 else dataclasses.replace(cfg, target_programs=target)
    return pick


def _mid_up(**fields):
    """gather_up's tiling with `fields` replaced for 16 < M <= 64 (the B=32 step), its split recomputed unless
    `fields` sets `split_k` (1: no float32 partials, no epilogue kernel)."""
    choose = selective_gemm_triton.choose_up_config

    def pick(M, K, A, gated=False, device=None):
        cfg = choose(M, K, A, gated, device)
        if not 16 < M <= 64:
            return cfg
        cfg = dataclasses.replace(cfg, **fields)
        if "split_k" in fields:
            return cfg
        return dataclasses.replace(cfg, split_k=selective_gemm_triton.up_split(M, K, A, cfg.block_m, cfg.block_a,
                                                                               cfg.block_k, gated))
    return pick


def _mid_down(**fields):
    """gather_down's tiling with `fields` replaced for 16 < M <= 64, its split recomputed unless `fields` sets
    `split_j` (1: no neuron split, so no float32 partials; each program writes its bf16 output tile)."""
    choose = selective_gemm_triton.choose_down_config

    def pick(M, D, A, device=None):
        cfg = choose(M, D, A, device)
        if not 16 < M <= 64:
            return cfg
        cfg = dataclasses.replace(cfg, **fields)
        if "split_j" in fields:
            return cfg
        return dataclasses.replace(cfg, split_j=selective_gemm_triton.down_split(M, D, A, cfg.block_m, cfg.block_j,
                                                                                 cfg.block_d))
    return pick


def _mid_mask(**fields):
    """union_mask's tiling with `fields` replaced for 16 < B <= 64 rows."""
    choose = union_select_triton.choose_select_config

    def pick(B, r, N, device=None):
        cfg = choose(B, r, N, device)
        return dataclasses.replace(cfg, **fields) if 16 < B <= 64 else cfg
    return pick


def _mid_f32(**fields):
    """The routers' float32 GEMV tiling (`choose_f32_config`) with `fields` replaced at 17-32 rows."""
    choose = dense_gemv_triton.choose_f32_config

    def pick(M, K, N, layout, device=None):
        cfg = choose(M, K, N, layout, device)
        return dataclasses.replace(cfg, **fields) if 16 < M <= 32 else cfg
    return pick


def _overlap(**fields):
    """The shared launches of attention and the MLP selection (`attention_union_triton.choose_overlap_config`) with
    `fields` replaced (mask_first, num_stages, num_warps)."""
    choose = attention_union_triton.choose_overlap_config

    def pick(*args, **kw):
        cfg = choose(*args, **kw)
        return cfg if cfg is None else dataclasses.replace(cfg, **fields)
    return pick


_committed_router_selector = sparsify.router_selector


def _router_selector(**fixed):
    def build(*args, **kw):
        return _committed_router_selector(*args, **{**kw, **fixed})
    return build


_committed_unit_top_k = sparsify.unit_top_k


def _unit_top_k_xla(scores, k, bias=None, *, offset=0, units=None, impl="auto"):
    """Heads' top-k as XLA's pairwise ranking (two reductions, the bias add fused in) instead of one kernel."""
    return _committed_unit_top_k(scores, k, bias, offset=offset, units=units, impl="xla")


def _unit_top_k_lax(scores, k, bias=None, *, offset=0, units=None, impl="auto"):
    """Heads' top-k by XLA's TopK (one kernel, a sort) on the biased logits."""
    units = scores.shape[1] - offset if units is None else units
    logits = scores[:, offset:offset + units] + (0.0 if bias is None else bias.astype(jnp.float32))
    return jax.lax.top_k(logits, k)[1].astype(jnp.int32)


_committed_union_select = selection.union_select


def _union_select_u16(u, w, live, threshold, capacity, impl="auto", *, u_offset=0, clamp_count=False, w_layout="rn"):
    """union_select on the MLP router's columns of the shared float32 product cast to w's dtype first. The kernel
    rounds them to that dtype as it reads them anyway (the same selection), but each of its programs reads all
    of u from L2: half the bytes in 16 bits. The cast can fuse into the kernel that sums the product's partials."""
    if u.dtype == jnp.float32 and w.dtype != jnp.float32:
        u, u_offset = u[:, u_offset:].astype(w.dtype), 0
    return _committed_union_select(u, w, live, threshold, capacity, impl, u_offset=u_offset, clamp_count=clamp_count,
                                   w_layout=w_layout)


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
        "attn_st3": ((selective_attention_triton, "choose_attn_config", _small_batch_attn(num_stages=3)),),
        "attn_w8": ((selective_attention_triton, "choose_attn_config", _small_batch_attn(num_warps=8)),),
        # which projections take the Pallas GEMV (dense_gemv.GEMV_ROWS): the out-major MLP weights up to 16 rows
        # (the rule until 2026-12-07), B=1 only, every projection up to 16 rows, and the (in, out) weights at
        # 17-32 rows but not the out-major ones
        "gemv_nk16": ((dense_gemv, "GEMV_ROWS", {"nk": ((1, 16),), "kn": ((1, 1),)}),),
        "gemv_b1_only": ((dense_gemv, "GEMV_ROWS", {"nk": ((1, 1),), "kn": ((1, 1),)}),),
        "gemv_all16": ((dense_gemv, "GEMV_ROWS", {"nk": ((1, 16),), "kn": ((1, 16),)}),),
        "gemv_kn32": ((dense_gemv, "GEMV_ROWS", {"nk": ((1, 16),), "kn": ((1, 1), (17, 32))}),),
        # Q/K/V GEMV tilings at B=1 (192 programs of 64 columns are 1.45 waves on 132 SMs)
        "multi_bn32": ((unit_gemv_triton, "choose_multi_config", _multi(32)),),
        "multi_bn32_st6": ((unit_gemv_triton, "choose_multi_config", _multi(32, 6)),),
        "multi_st3": ((unit_gemv_triton, "choose_multi_config", _multi(None, 3)),),
        # fewer stages / narrower k-steps: two programs per SM fit in shared memory
        "multi_st2": ((unit_gemv_triton, "choose_multi_config", _multi(None, 2)),),
        "multi_k128": ((unit_gemv_triton, "choose_multi_config", _multi(None, 4, 128)),),
        "gemv_st2": ((dense_gemv_triton, "choose_gemv_config", _gemv_stages(2)),),
        "gemv_st3": ((dense_gemv_triton, "choose_gemv_config", _gemv_stages(3)),),
        "rows_st2": ((unit_gemv_triton, "choose_rows_config", _rows_stages(2)),),
        # one product for the head router and the MLP router's first matrix; XLA's TopK for the heads
        "fuse_routers": ((db, "router_selector", _router_selector(fuse_routers=True)),),
        "no_fuse_routers": ((db, "router_selector", _router_selector(fuse_routers=False)),),
        "fuse_routers_b8": ((sparsify, "FUSE_ROUTERS_MAX_BATCH", 8),),
        # at 17-32 rows one product for both routers through the split-K GEMV (pallas_kernels.gemv_f32)
        "first_gemv": ((sparsify, "FUSE_AT_FIRST_GEMV_ROWS", True),),
        # the decode-step norms as one Pallas kernel per call: off, and up to 16 rows
        "no_row_norm": ((row_norm_mod, "ROW_NORM_MAX_M", 0),),
        "row_norm16": ((row_norm_mod, "ROW_NORM_MAX_M", 16),),
        # up to 32 rows: at B=32 each sublayer's output (gather_down's 8 float32 partials, the O projection's two)
        # would be summed, added and normalised by one kernel instead of XLA's add fusion and norm fusion
        "row_norm32": ((row_norm_mod, "ROW_NORM_MAX_M", 32),),
        # the cache append through XLA's scatters instead of the one-launch kernel
        "no_kv_append": ((kv_append_mod, "KV_APPEND_MAX_B", 0),),
        # every sublayer output finished and added by XLA, not by the next norm's kernel (add_row_norm)
        "no_add_norm": ((base.Block, "defers_residual", lambda self, x, step: False),),
        # the heads' top-k: XLA's ranking (before pallas_kernels.unit_top_k), XLA's TopK
        "head_topk_xla": ((sparsify, "unit_top_k", _unit_top_k_xla),),
        "head_topk_lax": ((sparsify, "unit_top_k", _unit_top_k_lax),),
        # the MLP router's second matrix stored neuron-major ([N, rank]: one contiguous run per neuron block)
        "router_nr": ((sparsify, "MLP_ROUTER_LAYOUT", "nr"),),
        # union_mask at 17-64 rows with 128 neurons per program: half the programs, so half the re-reads of the
        # routers' float32 product u (at B=32 each of the 256 programs reads all of u, 128 KB: as many bytes from L2
        # as the router matrix from HBM); with 8 warps too
        "mask_n128": ((union_select_triton, "choose_select_config", _mid_mask(block_n=128)),),
        "mask_n128_w8": ((union_select_triton, "choose_select_config", _mid_mask(block_n=128, num_warps=8)),),
        "mask_u16": ((selection, "union_select", _union_select_u16),),
        # the routers' float32 GEMV at 17-32 rows (default: 33 column blocks of 32 x 4 splits of 4 k-steps, ~6 us
        # per layer for 8.6 MB at OPT-6.7B B=32, and its partials' sum, a second kernel of ~1.4 us): 16 columns x 2
        # splits (8 k-steps each), 8 splits (2 programs per SM), or no split (66 programs of 16 k-steps, 3 or 6
        # stages: no partials, so no second kernel; half the SMs, each with more loads in flight)
        "f32_n16_s2": ((dense_gemv_triton, "choose_f32_config", _mid_f32(block_n=16, split_k=2)),),
        "f32_s8": ((dense_gemv_triton, "choose_f32_config", _mid_f32(split_k=8)),),
        "f32_n16_s1": ((dense_gemv_triton, "choose_f32_config", _mid_f32(block_n=16, split_k=1)),),
        "f32_n16_s1_st6": ((dense_gemv_triton, "choose_f32_config", _mid_f32(block_n=16, split_k=1, num_stages=6)),),
        # the MLP selection (threshold rule) in attention's two launches instead of its own two kernels after them
        # (pallas_kernels.select_decode_union): union_mask's blocks after attention's programs, or before them,
        # and with 3 pipeline stages for both (default: attention's 2)
        "overlap": ((sparsify, "OVERLAP_MLP_SELECTION", True),),
        "overlap_mask_first": ((sparsify, "OVERLAP_MLP_SELECTION", True),
                               (attention_union_triton, "choose_overlap_config", _overlap(mask_first=True))),
        "overlap_st3": ((sparsify, "OVERLAP_MLP_SELECTION", True),
                        (attention_union_triton, "choose_overlap_config", _overlap(num_stages=3))),
        # at 17-32 rows the routers' shared first product in the Q/K/V launch (gemv_multi's float32 output) instead
        # of its own split-K GEMV and the kernel summing that GEMV's partials
        "first_in_qkv": ((sparsify, "FIRST_PRODUCT_IN_QKV", True),),
        # the routers' shared first product through the split-K GEMV from 2 rows on, not only at 17-32 (at B=8 the
        # two products are XLA's; router + selection was 8.3 % of the dense step there, 2026-12-08)
        "first_gemv_b8": ((sparsify, "FIRST_GEMV_ROWS", (2, 32)),),
        # flash-decoding split targets at B >= 8
        "attn_t2112": ((selective_attention_triton, "choose_attn_config", _attn_target(2112)),),
        "attn_t528": ((selective_attention_triton, "choose_attn_config", _attn_target(528)),),
        # gather kernels at 16 < M <= 64 (OPT-6.7B B=32: 2.5-2.7 TB/s)
        "up_a16": ((selective_gemm_triton, "choose_up_config", _mid_up(block_a=16)),),
        "up_k256": ((selective_gemm_triton, "choose_up_config", _mid_up(block_k=256, num_stages=3)),),
        "down_d64": ((selective_gemm_triton, "choose_down_config", _mid_down(block_d=64, num_warps=4, num_stages=4)),),
        "down_d256": ((selective_gemm_triton, "choose_down_config", _mid_down(block_j=64, block_d=256)),),
        # the dense GEMV's tiles (86 % of the bandwidth at OPT-6.7B B=32, where the gathers reach 62 %): 64 rows x
        # 256-wide k-steps, 3 stages for the up projection; 256 neurons per step x 64 columns, 4 stages for the down
        "up_gemv": ((selective_gemm_triton, "choose_up_config", _mid_up(block_a=64, block_k=256, num_stages=3)),),
        # the same tiles without the split its recomputation chose (so no partials and no epilogue kernel), and 128
        # neurons per program: each k-step of the default loads as many x bytes (from L2) as weight bytes; these
        # halve and quarter that, with 96 and 48 programs (fewer than the SMs)
        "up_a64_nosplit": ((selective_gemm_triton, "choose_up_config",
                            _mid_up(block_a=64, block_k=256, num_stages=3, split_k=1)),),
        "up_a128_nosplit": ((selective_gemm_triton, "choose_up_config",
                             _mid_up(block_a=128, block_k=128, num_stages=4, split_k=1)),),
        "down_gemv": ((selective_gemm_triton, "choose_down_config",
                       _mid_down(block_j=256, block_d=64, num_warps=4, num_stages=4)),),
        # no neuron split: 128 programs of 32 output columns, each over all kept neurons. The default's 8 splits
        # write and re-read [8, 32, 4096] float32 partials (8 MB against the 50 MB of weights it reads)
        "down_direct": ((selective_gemm_triton, "choose_down_config",
                         _mid_down(block_j=256, block_d=32, num_warps=4, num_stages=4, split_j=1)),),
    }


def code_table(codes: list[str]) -> dict:
    """`variants()` plus each combination in `codes`: "a+b" applies the changes of a and of b together."""
    table = variants()
    for code in codes:
        if code not in table:
            unknown = [part for part in code.split("+") if part not in table]
            if unknown:
                raise SystemExit(f"unknown code variant(s) {unknown}; known: {sorted(variants())}")
            table[code] = tuple(change for part in code.split("+") for change in table[part])
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["opt-6.7b:1:2048:dense,both", "llama2-7b:1:4096:dense,heads"],
                    help="shape:batch:context:selector variants")
    ap.add_argument("--code", nargs="+", default=list(variants()),
                    help="code variants (first: the reference); a+b applies a's and b's changes together")
    ap.add_argument("--attn-density", type=float, default=None, help="default: 0.3 for OPT, 0.5 otherwise")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=1024, help="MLP router rank")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    table = code_table(args.code)
    rows, failed = [], []
    for point in args.points:
        shape, batch, context, sels = point.split(":")
        batch, context = int(batch), int(context)
        cfg = SHAPES[shape]
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        graphdef, state = split_graph(build_model(cfg, dtype=dtype))
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
        runs = {}
        ref_logits = {}
        for code in args.code:
            jax.clear_caches()
            with patched(*table[code]):
                for v in db.build_variants(cfg, names, batch, context, bundle, density, dtype, None):
                    t0 = time.perf_counter()
                    try:
                        traced = db.run_steps_on_device.trace(graphdef, state, cache, tokens, v.selector, args.steps,
                                                              v.gemv_impl)
                        launches = launches_in(traced.jaxpr)  # Pallas kernels per step, before XLA merges any
                        fn = traced.lower().compile()
                        logits, cache = fn(state, db._reset(cache, context), tokens, v.selector)
                    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a finding
                        print(f"{shape} B={batch} {v.name} {code}: FAILED {e!r:.300}", flush=True)
                        failed.append(dict(shape=shape, batch=batch, selector=v.name, code=code, error=repr(e)[:2000]))
                        continue
                    lg = np.asarray(logits, np.float32)
                    ref_logits.setdefault(v.name, lg)
                    runs[(code, v.name)] = dict(compile_s=time.perf_counter() - t0, times=[], fn=fn, selector=v.selector,
                                                max_logit_diff=float(np.abs(lg - ref_logits[v.name]).max()),
                                                launches=dict(sorted(launches.items())))
        for _ in range(args.repeats):
            for (code, name), r in runs.items():
                c = db._reset(cache, context)
                t = time.perf_counter()
                logits, cache = r["fn"](state, c, tokens, r["selector"])
                logits.block_until_ready()
                r["times"].append((time.perf_counter() - t) / args.steps)
        for (code, name), r in runs.items():
            first = runs.get((args.code[0], name))
            base_t = statistics.median(first["times"]) if first else float("nan")
            med = statistics.median(r["times"])
            rows.append(dict(shape=shape, batch=batch, context=context, selector=name, code=code, step_ms=1e3 * med,
                             times_ms=[1e3 * t for t in r["times"]], ratio_to_first=med / base_t,
                             compile_s=r["compile_s"], max_logit_diff_vs_first=r["max_logit_diff"],
                             pallas_launches=r["launches"]))
            print(f"{shape:10s} B={batch:3d} L={context:5d} {name:6s} {code:12s} {1e3 * med:8.3f} ms "
                  f"x{med / base_t:.3f} (logits diff {r['max_logit_diff']:.2e}, "
                  f"{sum(r['launches'].values())} Pallas launches per step)", flush=True)
        del cache, graphdef, state
        if args.out:  # after every point: a call stopped at its time limit keeps the points it finished
            _write(args.out, rows, failed)
    return 0


def _write(path: str, rows: list, failed: list) -> None:
    meta = dict(device=str(jax.devices()[0].device_kind if hasattr(jax.devices()[0], "device_kind") else jax.devices()[0]),
                jax_version=jax.__version__, date=datetime.date.today().isoformat(),
                command="python benchmarks/decode/step_variants.py " + " ".join(sys.argv[1:]),
                xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows, failed=failed)
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
