"""Tensor-parallel decode benchmark (issue 15): all-reduce latency, dense and sparse TP step times.

For each shape (real dimensions, all layers, random bf16 weights created directly on their shards), TP
degree n (a (1, n) mesh over the first n GPUs), batch size and context:

- `allreduce`: the cost of one decode all-reduce of [B, d] activations (the model's dtype): 50 psums in a
  row in one program under shard_map, each followed by a little elementwise work, minus the same program
  without the psums (the issue's method), divided by 50. Times 2 per layer = the step's all-reduce time
  if nothing overlaps, reported as a share of the dense step;
- `dense`, `sparse-global`, `sparse-balanced`: `--steps` decode steps in one executable (a device loop,
  as `generate` runs them) under shard_map with the model's own layer code and the two psums per layer;
  sparse = heads (KV groups for GQA) at the shape's density, plus the MLP union for ReLU (OPT) models,
  with routers of the paper's shapes and random weights whose union thresholds are calibrated for the
  paper's union density on Gaussian router inputs (what a LayerNorm'd random model feeds them);
  global = each sequence's k best units overall, balanced = ceil(k/n) on each shard.

Per point: step time, tokens/s, fraction of the aggregate memory roofline (the step's bytes over n times
one GPU's measured copy bandwidth), sparse speedup over dense at the same n, and the Amdahl bound (the
step's bytes dense / sparse, with the all-reduce time held fixed). Dense and global logits are compared
with n = 1 when that was measured (a correctness check of the sharded step on the GPUs).

    python benchmarks/decode/tp_bench.py --shapes llama2-13b opt-30b opt-66b llama3.1-70b --tp 2 4 \\
        --batches 16 64 256 --contexts 2048 4096                  # GPUs; JSON + table under $OUT
    python benchmarks/decode/tp_bench.py --tiny                   # CPU (4 fake devices): the code path

Takes --coordinator/--num-processes/--process-id (polar_jax.distributed) to span several hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from polar_jax import tensor_parallel as tp
from polar_jax.bench.decode_bench import measure_bandwidth, step_bytes
from polar_jax.bench.shapes import _OPT
from polar_jax.bench.sharded import sharded_cache, sharded_model_state, steps_on_mesh
from polar_jax.bench.synthetic import calibrate_union, gaussian_router_inputs, paper_union, random_bundle
from polar_jax.config import ModelConfig, RopeConfig
from polar_jax.distributed import add_distributed_args, config_from_args, initialize
from polar_jax.routers.config import units_kept
from polar_jax.routers.sparsify import router_selector
from polar_jax.selection import shard_budget
from polar_jax.sharding import TENSOR, make_mesh

# the shapes (public configs), and tiny ones that split over 4 CPU devices
SHAPE_ARGS: dict[str, dict[str, Any]] = {
    "llama2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128),
    "llama3.1-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                         num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128),
    "opt-30b": dict(model_type="opt", hidden_size=7168, num_layers=48, num_heads=56),
    "opt-66b": dict(model_type="opt", hidden_size=9216, num_layers=64, num_heads=72),
    "tiny-opt-tp": dict(model_type="opt", hidden_size=64, num_layers=3, num_heads=8, head_dim=8, vocab_size=512,
                        intermediate_size=256, dtype="float32"),
    "tiny-llama-tp": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                          num_heads=8, num_kv_heads=4, head_dim=8, dtype="float32"),
}
REAL = ("llama2-13b", "opt-30b", "opt-66b", "llama3.1-70b")
TINY = ("tiny-opt-tp", "tiny-llama-tp")
# heads kept: the paper's 0.3 for OPT; LLaMA-3.1-70B's goal is at group density 0.625
DENSITY = {"opt": 0.3, "llama": 0.625}
CHAIN = 50  # all-reduces in a row per timed program
MEMORY_LIMIT = 120e9  # bytes of weights + KV per GPU (H200: ~141 GB)
VARIANTS = ("dense", "sparse-global", "sparse-balanced")


def shape_config(name: str) -> ModelConfig:
    a = dict(SHAPE_ARGS[name])
    if a["model_type"] == "opt":
        d = a["hidden_size"]
        kw = dict(_OPT, intermediate_size=4 * d, num_kv_heads=a["num_heads"], word_embed_proj_dim=d)
        kw.update(a)
        if "tiny" in name:
            kw.update(max_position_embeddings=1024)
        kw["word_embed_proj_dim"] = kw["hidden_size"]
        return ModelConfig(**kw)
    kw = dict(max_position_embeddings=8448, dtype="bfloat16")
    if name == "llama3.1-70b":
        kw["rope"] = RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
    kw.update(a)
    return ModelConfig(**kw)


# ---- building on the mesh ----------------------------------------------------------------------------------------
def selectors(cfg, batch: int, density: float, tensor: int, rank: int, dtype) -> dict[str, Any]:
    """Global and balanced top-k router selectors with random routers; ReLU models also select the MLP
    union, calibrated for the paper's union density at this batch size."""
    bundle = random_bundle(cfg, rank, dtype)
    if cfg.relu_mlp:
        bundle = calibrate_union(bundle, gaussian_router_inputs(cfg, batch), batch, paper_union(batch))
    kw = dict(attn_density=density, mlp_recall=0.99 if cfg.relu_mlp else None, mlp=cfg.relu_mlp, dtype=dtype)
    return {"sparse-global": router_selector(bundle, **kw),
            "sparse-balanced": router_selector(bundle, **kw, balance=tensor)}


def _chain(mesh, n: int, reduce: bool):

    def body(x):
        for _ in range(n):  # unrolled: n all-reduces in a row, each followed by elementwise work
            y = jax.lax.psum(x, TENSOR) if reduce else x
            x = (y * 0.5 + 1.0).astype(x.dtype)
        return x

    return jax.jit(tp.on_mesh(body, mesh, P(), P()))


def time_fn(fn, *args, repeats: int) -> list[float]:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return times


def allreduce_us(mesh, batch: int, d: int, dtype, repeats: int) -> dict[str, float]:
    """One all-reduce of [batch, d] in `dtype` across the mesh's "tensor" axis, in microseconds."""

    x = jnp.ones((batch, d), dtype)
    with_psum = statistics.median(time_fn(_chain(mesh, CHAIN, True), x, repeats=repeats))
    without = statistics.median(time_fn(_chain(mesh, CHAIN, False), x, repeats=repeats))
    return {"us": max(0.0, (with_psum - without) / CHAIN * 1e6), "chain_s": with_psum, "elementwise_s": without,
            "bytes": int(batch * d * jnp.dtype(dtype).itemsize)}


# ---- one point ---------------------------------------------------------------------------------------------------
def bench_point(cfg, shape: str, tensor: int, batch: int, context: int, args, bandwidth: float,
                reference: dict) -> list[dict]:



    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    mesh = make_mesh(tensor=tensor)
    graphdef, state = sharded_model_state(cfg, dtype, mesh)
    cache = sharded_cache(cfg, batch, context + args.steps + 8, context, dtype, mesh)
    tokens = jnp.asarray(np.random.default_rng(batch).integers(0, cfg.vocab_size, batch), jnp.int32)
    density = args.attn_density or DENSITY[cfg.family]
    ar = allreduce_us(mesh, batch, cfg.hidden_size, dtype, args.repeats) if tensor > 1 else None
    ar_step_s = 0.0 if ar is None else 2 * cfg.num_layers * ar["us"] * 1e-6
    units = cfg.num_kv_heads
    k = units_kept(density, units)
    kept = {"dense": units, "sparse-global": k,
            "sparse-balanced": tensor * min(shard_budget(k, tensor), units // tensor)}
    mlp_frac = paper_union(batch) if cfg.relu_mlp else 1.0
    sels = {"dense": None, **selectors(cfg, batch, density, tensor, args.rank, dtype)}
    reset = lambda c: dataclasses.replace(c, lengths=jnp.full_like(c.lengths, context))  # noqa: E731
    rows = []
    for name in args.variants:
        sel = sels[name]
        t0 = time.perf_counter()
        logits, cache = steps_on_mesh(graphdef, state, reset(cache), tokens, sel, args.steps, mesh)
        logits = np.asarray(logits[:, :64], np.float32)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            c = reset(cache)
            t = time.perf_counter()
            out, cache = steps_on_mesh(graphdef, state, c, tokens, sel, args.steps, mesh)
            out.block_until_ready()
            times.append((time.perf_counter() - t) / args.steps)
        step = statistics.median(times)
        nbytes = step_bytes(cfg, batch, context, itemsize, attn_frac=kept[name] / units,
                            mlp_frac=1.0 if name == "dense" else mlp_frac)["total"]
        row = {"shape": shape, "tp": tensor, "batch": batch, "context": context, "variant": name,
               "step_s": step, "step_s_all": times, "compile_s": compile_s, "tokens_per_s": batch / step,
               "bytes": nbytes, "roofline_fraction": nbytes / (tensor * bandwidth) / step,
               "attn_density": None if name == "dense" else density, "units_kept": kept[name], "units": units,
               "mlp_target_density": None if name == "dense" or not cfg.relu_mlp else mlp_frac,
               "allreduce": ar, "allreduce_step_s": ar_step_s, "allreduce_share": ar_step_s / step}
        key = (shape, batch, context, name)
        if name != "sparse-balanced":  # same computation at every n: compare with n = 1
            if tensor == 1:
                reference[key] = logits
            elif key in reference:
                ref = reference[key].astype(np.float64)
                row["logits_rel_diff_vs_tp1"] = float(np.linalg.norm(logits - ref) / max(np.linalg.norm(ref), 1e-30))
        rows.append(row)
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    for r in rows:
        if dense is not None and r is not dense:
            r["speedup_vs_dense"] = dense["step_s"] / r["step_s"]
            comm = dense["allreduce_step_s"]
            rest = max(dense["step_s"] - comm, 1e-12)
            r["amdahl_bound"] = dense["step_s"] / (comm + rest * r["bytes"] / dense["bytes"])
    del cache, state
    jax.clear_caches()
    return rows


def fits(cfg, tensor: int, batch: int, context: int, steps: int) -> bool:
    itemsize = 2 if cfg.dtype == "bfloat16" else 4
    need = step_bytes(cfg, batch, context + steps + 8, itemsize)
    return (need["attn_proj"] + need["mlp"] + need["kv"] + need["other"]) / tensor <= MEMORY_LIMIT


# ---- report --------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = ("| shape | TP | B | ctx | variant | step ms | tok/s | roofline | all-reduce us | AR share |"
            " speedup | Amdahl | units |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        ar = r["allreduce"]["us"] if r["allreduce"] else None
        lines.append(
            f"| {r['shape']} | {r['tp']} | {r['batch']} | {r['context']} | {r['variant']} | {1e3 * r['step_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['roofline_fraction']:.2f} | {'-' if ar is None else f'{ar:.1f}'} | "
            f"{100 * r['allreduce_share']:.0f} % | {r.get('speedup_vs_dense', 1.0):.2f} | "
            f"{r.get('amdahl_bound', 1.0):.2f} | {r['units_kept']}/{r['units']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPE_ARGS),
                   help=f"default: {' '.join(REAL)} (--tiny: {' '.join(TINY)})")
    p.add_argument("--tp", nargs="+", type=int, default=None, help="TP degrees (default: 1, 2, 4 up to the GPUs)")
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--attn-density", type=float, default=None, help="heads / KV groups kept (default: per family)")
    p.add_argument("--rank", type=int, default=1024, help="MLP router rank (the paper's)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed executable")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bw-bytes", type=int, default=4 << 30, help="buffer of the bandwidth measurement")
    p.add_argument("--out", type=Path, default=None, help="folder for tp_bench.json / .md (default: $OUT)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU fake devices: checks the code path")
    add_distributed_args(p)
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = list(TINY if args.tiny else REAL)
    if args.tiny:
        args.batches, args.contexts = [4], [32]
        args.steps, args.repeats, args.rank, args.bw_bytes = 2, 2, 16, 1 << 20
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    initialize(config_from_args(args))  # before JAX touches a device


    n_dev = jax.device_count()
    degrees = args.tp or [n for n in (1, 2, 4, 8) if n <= n_dev]
    if jax.default_backend() != "gpu" and not args.tiny:
        sys.exit(f"the real shapes need GPUs (this host has {jax.default_backend()}); use --tiny on CPU")
    bw = measure_bandwidth(args.bw_bytes)
    bandwidth = bw["copy_Bps"]
    dev = jax.devices()[0]
    print(f"{n_dev} x {getattr(dev, 'device_kind', str(dev))}, jax {jax.__version__}, one device's copy "
          f"bandwidth {bandwidth / 1e12:.3f} TB/s; TP degrees {degrees}", flush=True)
    rows, skipped, reference = [], [], {}
    for shape in args.shapes:
        cfg = shape_config(shape)
        for tensor in degrees:
            if tensor > n_dev or cfg.num_kv_heads % tensor or cfg.intermediate_size % tensor:
                skipped.append(f"{shape} TP={tensor}: does not split")
                continue
            for context in args.contexts:
                for batch in args.batches:
                    if not fits(cfg, tensor, batch, context, args.steps):
                        skipped.append(f"{shape} TP={tensor} B={batch} ctx={context}: does not fit")
                        continue
                    for r in bench_point(cfg, shape, tensor, batch, context, args, bandwidth, reference):
                        rows.append(r)
                        print(f"  {shape:14s} TP={tensor} B={batch:4d} ctx={context:5d} {r['variant']:16s} "
                              f"{1e3 * r['step_s']:9.3f} ms  AR share {100 * r['allreduce_share']:4.1f} %", flush=True)
    for s in skipped:
        print(f"  skipped: {s}", flush=True)
    report = {"device": getattr(dev, "device_kind", str(dev)), "devices": n_dev, "processes": jax.process_count(),
              "backend": jax.default_backend(), "jax_version": jax.__version__, "bandwidth": bw,
              "date": datetime.date.today().isoformat(), "host": platform.node(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows, "skipped": skipped}
    md = table(rows)
    print(md)
    if args.out is not None and jax.process_index() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tp_bench.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "tp_bench.md").write_text(f"# TP decode benchmark ({report['device']} x {n_dev}, "
                                              f"{report['date']})\n\n`{report['command']}`\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
