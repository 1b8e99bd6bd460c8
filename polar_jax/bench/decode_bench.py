"""End-to-end decode benchmark: the whole jitted step, sparse variants against our own dense step.

For each shape (real dimensions, all layers, random bf16 weights), batch size and context, every
variant is timed in the same process, interleaved: `dense`, `heads` (per-sequence head / KV-group
selection), `mlp` (union neuron selection, ReLU models), `both`, and `auto` (what the step-level policy
picks from the committed table). Routers have the paper's architecture and rank with random weights, so
their cost is counted; MLP union densities follow PAPER.md's OPT table by batch size, reached by
thresholds calibrated on the step's own router inputs.

A step is timed as the wall clock of one executable that runs `--steps` decode steps in a device loop
(as `generate` does: no host round trip per token, stable buffers for CUDA-graph replay); the KV cache
is donated and its lengths reset before each run so the context stays fixed. Each worker process
reports the median of `--repeats` runs; `--processes K` starts K fresh worker processes (sharing a
persistent compilation cache, which also pins XLA's autotuning choices) and reports the median and
spread across them. `--breakdown` adds a CUPTI profile of each variant, mapped to the step's parts.

    polar-jax bench decode --shapes opt-6.7b --batches 1 8 32 --contexts 2048 --processes 3 --out DIR   # GPU
    polar-jax bench decode --tiny                                                                      # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.bench import breakdown as bd
from polar_jax.bench.report import print_table, write_report
from polar_jax.bench.shapes import LARGE, SHAPES
from polar_jax.bench.sharded import decode_loop, sharded_cache, sharded_model_state, steps_on_mesh
from polar_jax.bench.synthetic import (calibrate_heads, calibrate_union, gaussian_router_inputs, paper_union,
                                       random_bundle, random_cache)
from polar_jax.config import ModelConfig
from polar_jax.cli_common import DefaultsFormatter, Parser
from polar_jax.errors import InputError, PolarError
from polar_jax.files import read_json
from polar_jax.models import build_model
from polar_jax.models.collect import capture_intermediates
from polar_jax.policy import PARTS, choose_variant, model_class
from polar_jax.routers.sparsify import fuse_routers_for, router_selector
from polar_jax.sharding import check_mesh, is_parallel, make_mesh, mesh_shape
from polar_jax.tensor_parallel import DEFAULT_HEAD_TOPK, HEAD_TOPK
from polar_jax.validate import arg_type
from polar_jax.graph import merge as merge_graph, split as split_graph

DEFAULT_VARIANTS = ("dense", "heads", "mlp", "both", "auto", "dense-xla")
VARIANTS = DEFAULT_VARIANTS + ("heads-adaptive", "both-adaptive")
MESH_VARIANTS = ("dense", "heads", "mlp", "both")  # with --tensor/--data (no policy table, no GEMV switch)
# "dense-xla": the dense step with every projection through XLA's dot (no Pallas GEMV at small batch),
# to measure what the GEMV buys in the same process.
GEMV_OFF = {"dense-xla": "dense"}
# input-adaptive head budgets (per-sequence counts from a threshold calibrated on the step's own router
# inputs, the same mean as the fixed top-k), to time them against the fixed budget in the same process
ADAPTIVE = {"heads-adaptive": "heads", "both-adaptive": "both"}
MEMORY_LIMIT = 120e9  # bytes of weights + KV the benchmark allows on one GPU (H200: ~141 GB)


# ---- bytes one step must read --------------------------------------------------------------------------
def step_bytes(cfg: ModelConfig, batch: int, context: int, itemsize: int, attn_frac: float = 1.0,
               mlp_frac: float = 1.0, router: int = 0) -> dict[str, float]:
    """Bytes per decode step by part. `attn_frac` / `mlp_frac`: mean fraction of KV groups / neurons
    the sparse layers keep (layer 0 is dense); `router`: the routers' weight bytes."""
    d, n, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sparse_share = lambda frac: (1 + (L - 1) * frac) / L  # noqa: E731
    proj = L * (d * hq * hd * 2 + d * hkv * hd * 2) * itemsize
    mlp = L * (3 if cfg.gated_mlp else 2) * d * n * itemsize * sparse_share(mlp_frac)
    kv = 2 * L * batch * context * hkv * hd * itemsize * sparse_share(attn_frac)
    other = (cfg.vocab_size * cfg.embed_dim + 2 * batch * d + 4 * L * d) * itemsize
    parts = {"attn_proj": proj, "kv": kv, "mlp": mlp, "router": float(router), "other": other}
    parts["total"] = sum(parts.values())
    return parts


# ---- timing -------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "gemv_impl"), donate_argnames=("cache",))
def run_steps_on_device(graphdef, state, cache, tokens, selector, steps: int, gemv_impl: str = "auto"):
    """`steps` decode steps in one executable (a device loop, as in `generate`)."""
    return decode_loop(merge_graph(graphdef, state), cache, tokens, selector, steps, gemv_impl=gemv_impl)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def probe_step(graphdef, state, cache, tokens, selector):
    """One decode step that also returns each layer's router input and selection sizes."""
    model = merge_graph(graphdef, state)
    (logits, cache), inter = capture_intermediates(model, lambda m: m.decode(tokens, cache, selector, collect=True))
    return logits, cache, inter


def _reset(cache, context: int):
    return dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, context))


def measure_bandwidth(nbytes: int = 4 << 30, reps: int = 20) -> dict[str, float]:
    """HBM bandwidth in bytes/s: an elementwise pass (read + write counted) and a full reduction (read)."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    out = {}
    for name, fn, factor in (("copy_Bps", jax.jit(lambda a: a + 1.0), 2), ("read_Bps", jax.jit(jnp.sum), 1)):
        fn(x).block_until_ready()
        t = time.perf_counter()
        for _ in range(reps):
            y = fn(x)
        y.block_until_ready()
        out[name] = factor * x.nbytes * reps / (time.perf_counter() - t)
    return out


@dataclasses.dataclass
class Variant:
    name: str
    selector: Any
    chose: str  # what it runs (for auto: the policy's choice)
    gemv_impl: str = "auto"
    sizes: dict = dataclasses.field(default_factory=dict)
    times: list = dataclasses.field(default_factory=list)
    breakdown: dict | None = None
    kernels: list | None = None
    logits: np.ndarray | None = None


def build_variants(cfg: ModelConfig, names: list[str], batch: int, context: int, bundle, attn_density: float,
                   dtype, policy_table: dict | None, balance: int = 1) -> list[Variant]:
    out = []
    for name in names:
        chose = ADAPTIVE.get(name) or GEMV_OFF.get(name, name)
        if name == "auto":
            chose = choose_variant(cfg, batch, context, cfg.relu_mlp, table=policy_table)
        attn, mlp = PARTS[chose]
        if mlp and not cfg.relu_mlp:
            continue
        sel = None
        if attn or mlp:
            sel = router_selector(bundle, attn_density=attn_density, mlp_recall=0.99 if mlp else None, attn=attn,
                                  mlp=mlp, dtype=dtype, balance=balance, fuse_routers=fuse_routers_for(batch),
                                  adaptive=name in ADAPTIVE)
        out.append(Variant(name, sel, chose, gemv_impl="xla" if name in GEMV_OFF else "auto"))
    return out


def heads_kept(sel: Any) -> list[int]:
    """Attention units a row keeps at each layer the selector has a head router for. A fixed budget: its count
    (`attn_kept`, every unit where the balanced rule reaches them all). An adaptive one: every unit where its
    floor does (the layer runs dense), else the calibrated mean k; `attn_kept` would round the mean up per shard,
    and the rows of an adaptive budget vary between the floor and the cap around that mean."""
    out = []
    for i, w in enumerate(sel.attn_w):
        if w is None:
            continue
        if sel.budgets is None:
            out.append(sel.attn_kept(i))
        else:
            out.append(sel.units if sel.attn_floor(i) >= sel.units else min(sel.attn_k[i], sel.units))
    return out


def bench_point(graphdef, state, cfg: ModelConfig, batch: int, context: int, args: argparse.Namespace, bundle,
                policy_table: dict | None, mesh: Any = None) -> list[dict]:
    """Every variant at one (batch, context): compiled, then timed interleaved. With a tensor-parallel
    `mesh` the state is already on its shards, the cache is made on them and the steps run under shard_map."""
    dtype = jax.tree.leaves(state)[0].dtype
    density = args.mlp_density if args.mlp_density is not None else paper_union(batch)
    tokens = jnp.asarray(np.random.default_rng(batch).integers(0, cfg.vocab_size, batch), jnp.int32)
    if is_parallel(mesh):
        cache = sharded_cache(cfg, batch, context + args.steps + 8, context, dtype, mesh)

        def run_steps(graphdef, state, cache, tokens, selector, steps, gemv_impl):  # GEMV: "auto" on a mesh
            return steps_on_mesh(graphdef, state, cache, tokens, selector, steps, mesh)

        if cfg.relu_mlp:  # no probe step under shard_map: thresholds for Gaussian router inputs (LayerNorm'd)
            x = gaussian_router_inputs(cfg, batch)
            bundle = calibrate_union(bundle, x, batch, density)
        balance = mesh_shape(mesh)[1] if args.head_topk == "balanced" else 1
    else:
        run_steps = run_steps_on_device
        cache = random_cache(cfg, batch, context + args.steps + 8, context, dtype)
        adaptive = any(v in ADAPTIVE for v in args.variants)
        if cfg.relu_mlp or adaptive:  # thresholds from this step's own router inputs
            _, cache, inter = probe_step(graphdef, state, cache, tokens, None)
            cache = _reset(cache, context)
            x = np.asarray(inter["router_input"][:, :, 0], np.float32)
            if cfg.relu_mlp:
                bundle = calibrate_union(bundle, x, batch, density)
            if adaptive:
                bundle = calibrate_heads(bundle, x)
        balance = 1
    variants = build_variants(cfg, args.variants, batch, context, bundle, args.attn_density, dtype, policy_table,
                              balance)
    compile_s, failed = {}, []
    for v in variants:
        t0 = time.perf_counter()
        try:
            logits, cache = run_steps(graphdef, state, _reset(cache, context), tokens, v.selector, args.steps, v.gemv_impl)
            v.logits = np.asarray(logits[:, :64])
            if v.selector is not None and args.sizes:
                _, cache, inter = probe_step(graphdef, state, _reset(cache, context), tokens, v.selector)
                for key in ("attn_n_active", "mlp_n_active"):
                    if key in inter:
                        v.sizes[key] = np.asarray(inter[key]).tolist()
        except Exception as e:  # one failing variant is a finding, not the end of the run
            print(f"  B={batch} L={context} {v.name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            failed.append(v)
            continue
        compile_s[v.name] = time.perf_counter() - t0
    variants = [v for v in variants if v not in failed]
    if cfg.relu_mlp and not args.sizes:  # by construction the thresholds keep `density` at this step
        for v in variants:
            if v.selector is not None and v.selector.use_mlp:
                v.sizes["mlp_n_active"] = [max(1, int(round(density * cfg.intermediate_size)))]
    for v in variants:
        if v.selector is not None and v.selector.use_attn and "attn_n_active" not in v.sizes:
            sel = v.selector
            v.sizes["attn_n_active"] = kept = heads_kept(sel)
            if kept and min(kept) >= sel.units:  # the row would otherwise claim a head saving it does not make
                k = "the floor" if sel.budgets is not None else "k"
                why = f"ceil({k} / {sel.balance}) per shard on {sel.balance} shards" if sel.balance > 1 else k
                print(f"  B={batch} L={context} {v.name}: the head budget keeps every one of the {sel.units} "
                      f"attention units ({why}): its attention is dense", flush=True)
    for _ in range(args.repeats):  # interleaved: every variant once per round
        for v in variants:
            c = _reset(cache, context)
            t = time.perf_counter()
            logits, cache = run_steps(graphdef, state, c, tokens, v.selector, args.steps, v.gemv_impl)
            logits.block_until_ready()
            v.times.append((time.perf_counter() - t) / args.steps)
    if args.breakdown:
        for v in variants:
            hlo = run_steps_on_device.lower(graphdef, state, cache, tokens, v.selector, args.steps, v.gemv_impl).compile().as_text()
            scopes = bd.hlo_scopes(hlo)
            if args.save_hlo is not None:
                args.save_hlo.mkdir(parents=True, exist_ok=True)
                with gzip.open(args.save_hlo / f"{cfg.model_type}_{batch}_{context}_{v.name}.hlo.gz", "wt") as f:
                    f.write(hlo)
            with bd.Cupti() as prof:
                logits, cache = run_steps(graphdef, state, _reset(cache, context), tokens, v.selector, args.steps, v.gemv_impl)
                logits.block_until_ready()
            if prof.records:
                v.breakdown = bd.breakdown(prof.records, scopes, args.steps)
                v.kernels = bd.kernel_table(prof.records, scopes, args.steps)
    rows = []
    dense = next((v for v in variants if v.name == "dense"), None)
    for v in variants:
        data, tensor = mesh_shape(mesh) if is_parallel(mesh) else (1, 1)
        row = {"batch": batch, "context": context, "variant": v.name, "runs": v.chose, "tensor": tensor, "data": data,
               "kv_shard": list(cache.k[0].addressable_shards[0].data.shape),  # one device's part of a layer's K
               "step_s": statistics.median(v.times), "step_s_all": v.times, "compile_s": compile_s[v.name],
               "mlp_target_density": density if cfg.relu_mlp else None, "attn_density": args.attn_density,
               "sizes": v.sizes, "breakdown_ms": v.breakdown, "kernels": v.kernels}
        if dense is not None and v is not dense:
            a, b = v.logits.astype(np.float64), dense.logits.astype(np.float64)
            row["logits_rel_diff_vs_dense"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        rows.append(row)
    del cache
    return rows


def _fractions(cfg: ModelConfig, sizes: dict) -> tuple[float, float]:
    """Mean kept fraction over the sparse layers: KV groups (per live row) and MLP neurons (-1 = dense)."""
    attn = 1.0
    if "attn_n_active" in sizes:
        attn = float(np.mean(sizes["attn_n_active"])) / cfg.num_kv_heads
    mlp = 1.0
    if "mlp_n_active" in sizes:
        n = np.asarray(sizes["mlp_n_active"], np.float64)
        mlp = float(np.mean(np.where(n < 0, cfg.intermediate_size, n))) / cfg.intermediate_size
    return attn, mlp


def worker(args: argparse.Namespace) -> dict:
    dev = jax.devices()[0]
    bws = measure_bandwidth(args.bw_bytes)
    policy_table = read_policy(args.policy) if args.policy else None
    out = {"device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
           "jax_version": jax.__version__, "pid": os.getpid(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "bandwidth": bws, "rows": []}
    print(f"[{os.getpid()}] {out['device']}, jax {jax.__version__}, copy {bws['copy_Bps'] / 1e12:.2f} TB/s, "
          f"read {bws['read_Bps'] / 1e12:.2f} TB/s", flush=True)
    mesh = make_mesh(tensor=args.tensor, data=args.data or 1) if args.tensor or args.data else None
    if mesh is not None:
        out["mesh"] = dict(zip(("data", "tensor"), mesh_shape(mesh)))
    for shape in args.shapes:
        cfg = SHAPES[shape]
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        if is_parallel(mesh):  # made on its shards: no device holds a whole tensor
            check_mesh(cfg, mesh)
            graphdef, state = sharded_model_state(cfg, dtype, mesh)
        else:
            graphdef, state = split_graph(build_model(cfg, dtype=dtype))
        bundle = random_bundle(cfg, args.rank, dtype)
        for context in args.contexts:
            for batch in args.batches:
                need = step_bytes(cfg, batch, context + args.steps + 8, jnp.dtype(dtype).itemsize)
                shards = mesh_shape(mesh)[1] if is_parallel(mesh) else 1
                if (need["attn_proj"] + need["mlp"] + need["kv"] + need["other"]) / shards > MEMORY_LIMIT:
                    print(f"  {shape} B={batch} L={context}: skipped (does not fit one GPU)", flush=True)
                    continue
                for r in bench_point(graphdef, state, cfg, batch, context, args, bundle, policy_table, mesh):
                    r["shape"] = shape
                    r["model_class"] = model_class(cfg)
                    out["rows"].append(r)
                    print(f"  {shape:12s} B={batch:4d} L={context:5d} {r['variant']:6s}({r['runs']:5s}) "
                          f"{1e3 * r['step_s']:8.3f} ms", flush=True)
        del graphdef, state
    return out


# ---- driver: fresh processes, merge, derived numbers ----------------------------------------------------
def _worker_argv(args: argparse.Namespace, json_out: str) -> list[str]:
    argv = [sys.executable, "-m", "polar_jax.bench.decode_bench", "--worker", json_out, "--shapes", *args.shapes,
            "--batches", *map(str, args.batches), "--contexts", *map(str, args.contexts), "--variants",
            *args.variants, "--attn-density", str(args.attn_density), "--rank", str(args.rank), "--steps",
            str(args.steps), "--repeats", str(args.repeats), "--bw-bytes", str(args.bw_bytes)]
    if args.mlp_density is not None:
        argv += ["--mlp-density", str(args.mlp_density)]
    if args.policy:
        argv += ["--policy", args.policy]
    if args.sizes:
        argv.append("--sizes")
    for flag in ("tensor", "data"):
        if getattr(args, flag):
            argv += [f"--{flag}", str(getattr(args, flag))]
    return argv + ["--head-topk", args.head_topk]


def run_processes(args: argparse.Namespace) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tmp, "jax_cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        for i in range(args.processes):
            path = os.path.join(tmp, f"worker{i}.json")
            argv = _worker_argv(args, path)
            if args.breakdown and i == 0:
                argv.append("--breakdown")
            subprocess.run(argv, check=True, env=env)
            results.append(json.loads(Path(path).read_text()))
    return results


def merge(workers: list[dict], args: argparse.Namespace) -> dict:
    """Median and spread over processes of each point's per-process median; derived ratios."""
    first = workers[0]
    bw = max(max(w["bandwidth"].values()) for w in workers)
    merged = {"device": first["device"], "jax_version": first["jax_version"], "backend": first["backend"],
              "mesh": first.get("mesh"),
              "date": datetime.date.today().isoformat(), "host": platform.node(),
              "command": "polar-jax bench decode " + " ".join(args.argv), "processes": len(workers),
              "bandwidth_Bps": bw, "bandwidths": [w["bandwidth"] for w in workers], "rows": []}
    keys = {}
    for w in workers:
        for r in w["rows"]:
            keys.setdefault((r["shape"], r["batch"], r["context"], r["variant"]), []).append(r)
    for (shape, batch, context, variant), rs in keys.items():
        cfg = SHAPES[shape]
        times = [r["step_s"] for r in rs]
        row = dict(rs[0])
        row.update(step_s=statistics.median(times), step_s_processes=times, spread=(min(times), max(times)),
                   processes=len(times),
                   breakdown_ms=next((r["breakdown_ms"] for r in rs if r.get("breakdown_ms")), None),
                   kernels=next((r["kernels"] for r in rs if r.get("kernels")), None))
        attn, mlp = _fractions(cfg, row["sizes"])
        item = 2 if cfg.dtype == "bfloat16" else 4
        sel = row["runs"]
        router = 0
        if sel != "dense":
            router = _router_bytes(cfg, args.rank, PARTS[sel], item)
        b = step_bytes(cfg, batch, context, item, attn, mlp, router)
        # on a mesh: each "data" replica reads every weight once, the KV cache is read once in all, and
        # the step has the bandwidth of every device
        data, tensor = row.get("data", 1), row.get("tensor", 1)
        read = b["total"] + (data - 1) * (b["total"] - b["kv"])
        row.update(attn_fraction=attn, mlp_fraction=mlp, bytes=b, tokens_per_s=batch / row["step_s"],
                   roofline_fraction=read / (bw * data * tensor) / row["step_s"])
        merged["rows"].append(row)
    by_point = {}
    for r in merged["rows"]:
        by_point.setdefault((r["shape"], r["batch"], r["context"]), {})[r["variant"]] = r
    for variants in by_point.values():
        dense = variants.get("dense")
        if dense is None:
            continue
        for r in variants.values():
            r["speedup"] = dense["step_s"] / r["step_s"]
            no_router = r["bytes"]["total"] - r["bytes"]["router"]
            r["amdahl_bound"] = dense["bytes"]["total"] / no_router
            r["bound_fraction"] = r["speedup"] / r["amdahl_bound"]
    return merged


def _router_bytes(cfg: ModelConfig, rank: int, parts: tuple[bool, bool], itemsize: int) -> int:
    attn, mlp = parts
    units = cfg.num_kv_heads if cfg.num_kv_heads < cfg.num_heads else cfg.num_heads
    per = (cfg.hidden_size + 1) * units if attn else 0
    if mlp and cfg.relu_mlp:
        per += rank * (cfg.hidden_size + cfg.intermediate_size)
    return (cfg.num_layers - 1) * per * itemsize


PROVENANCE_KEYS = ("source", "date", "jax_version")


def policy_table(merged: dict) -> dict:
    """The step-level policy's table from a run: per point, each variant's speedup over dense (each entry
    names its run, as entries of several runs and devices end up in one file)."""
    run = {"source": merged.get("command"), "date": merged["date"], "jax_version": merged["jax_version"]}
    entries = {}
    for r in merged["rows"]:
        if r["variant"] in PARTS and "speedup" in r:
            e = entries.setdefault((r["shape"], r["batch"], r["context"]), {
                "device": merged["device"], "model_class": r["model_class"], "shape": r["shape"],
                "batch": r["batch"], "context": r["context"], "speedup": {}, **run})
            e["speedup"][r["variant"]] = round(r["speedup"], 4)
    return {**run, "entries": list(entries.values())}


def _policy_key(e: dict) -> tuple:
    return e["device"], e["shape"], e["batch"], e["context"]


def merged_policy(old: dict | None, new: dict) -> dict:
    """`new`, plus the entries of the earlier table `old` for the points `new` did not measure (another device,
    shape, batch or context): a run on one GPU never erases what was measured on another. A point measured
    again takes the new entry. Carried entries keep their run's source, date and jax version."""
    fresh = {_policy_key(e) for e in new["entries"]}
    kept = [{**{k: old[k] for k in PROVENANCE_KEYS if k in old}, **e}
            for e in (old or {}).get("entries", []) if _policy_key(e) not in fresh]
    return {**new, "entries": kept + new["entries"]}


def merge_reports(paths: list[Path], argv: list[str]) -> dict:
    """Merges reports of separate runs (each process a fresh one) into one report: the same medians and
    spreads as `--processes K`, for runs that had to be split (a device call's time limit). A report of
    several processes counts as that many workers (each row's per-process medians)."""
    workers = []
    for path in paths:
        rep = read_json(path, InputError)
        try:
            for p in range(int(rep.get("processes", 1))):
                rows = []
                for r in rep["rows"]:
                    per = r.get("step_s_processes") or [r["step_s"]]
                    row = dict(r, step_s=per[min(p, len(per) - 1)])
                    if p:  # the profile belongs to the first process
                        row.update(breakdown_ms=None, kernels=None)
                    rows.append(row)
                workers.append({"device": rep["device"], "jax_version": rep["jax_version"], "backend": rep["backend"],
                                "bandwidth": rep["bandwidths"][min(p, len(rep["bandwidths"]) - 1)], "rows": rows,
                                "command": rep["command"], "date": rep["date"]})
        except (KeyError, IndexError, TypeError, ValueError):
            raise InputError(f"{path} is not a report of `polar-jax bench decode` (its JSON output)") from None
    args = argparse.Namespace(argv=argv, rank=int(next((a for a in _after(argv, "--rank")), 1024)))
    merged = merge(workers, args)
    merged["commands"] = sorted({w["command"] for w in workers})
    merged["date"] = max(w["date"] for w in workers)
    return merged


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def read_policy(path: str | Path) -> dict[str, Any]:
    """A policy table file (as `--write-policy` writes it); InputError for anything else."""
    table = read_json(path, InputError)
    if not isinstance(table.get("entries"), list):
        raise InputError(f"{path} is not a decode policy table (no \"entries\" list)")
    return table


def check_policy_target(path: Path) -> None:
    """InputError unless `path` is free or an earlier policy table (checked before measuring, and again
    before writing)."""
    if path.is_dir():
        raise InputError(f"--write-policy {path} is a folder: give a file name (e.g. {path / 'decode_policy.json'})")
    if path.exists():
        try:
            read_policy(path)
        except InputError:
            raise InputError(f"--write-policy {path} exists and is not a decode policy table: refusing to replace "
                             "it") from None


def write_policy(path: Path, table: dict[str, Any]) -> None:
    """Writes the policy table to `path`, through a temporary file renamed at the end. An earlier policy table
    there keeps its other points (`merged_policy`); any other file is refused."""
    check_policy_target(path)
    table = merged_policy(read_policy(path) if path.exists() else None, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)


# Flags --tiny sets when they are not given: tiny shapes and sizes that run in seconds on a CPU.
TINY = {"shapes": ["tiny-opt", "tiny-llama"], "batches": [1, 4], "contexts": [32], "steps": 2, "repeats": 2,
        "bw_bytes": 1 << 20, "rank": 16}
# 64 steps per timed call: each call also pays host work (argument flattening, jit's cache lookup) that a
# generation pays once; at 16 steps that added ~0.3 ms to each B=1 step on the H200 (7-13 %, against 48
# steps in the same device call: benchmarks/results/decode_1129c/notes.md).
DEFAULTS = {"shapes": ["opt-6.7b", "llama2-7b"], "batches": [1, 8, 32], "contexts": [2048], "steps": 64,
            "repeats": 5, "bw_bytes": 4 << 30, "rank": 1024}


class _Formatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """The module docstring as written, and every flag's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags. Mistakes raise CommandLineError / InputError (the CLI prints one `error:` line);
    numeric flags are typed by polar_jax.validate; large shapes are refused on a host without a GPU."""
    p = Parser(prog="polar-jax bench decode", description=__doc__, formatter_class=_Formatter)
    d = DEFAULTS
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                   help=f"model shapes (default: {' '.join(d['shapes'])}; with --tiny: {' '.join(TINY['shapes'])})")
    p.add_argument("--batches", nargs="+", type=arg_type("batch_size"), default=None,
                   help=f"batch sizes (default: {_words(d['batches'])}; with --tiny: {_words(TINY['batches'])})")
    p.add_argument("--contexts", nargs="+", type=arg_type("context"), default=None,
                   help=f"context lengths (default: {_words(d['contexts'])}; with --tiny: {_words(TINY['contexts'])})")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                   help=f"variants timed (default: {' '.join(DEFAULT_VARIANTS)}); "
                        f"{' and '.join(ADAPTIVE)}: input-adaptive head budgets")
    p.add_argument("--attn-density", type=arg_type("attn_density"), default=0.3, help="fraction of heads / KV groups kept")
    p.add_argument("--mlp-density", type=arg_type("mlp_density"), default=None,
                   help="MLP union density (default: PAPER.md's OPT table by batch size)")
    p.add_argument("--rank", type=arg_type("rank"), default=None,
                   help=f"MLP router rank (default: {d['rank']}, the paper's; with --tiny: {TINY['rank']})")
    p.add_argument("--steps", type=arg_type("steps"), default=None,
                   help=f"decode steps per timed executable (default: {d['steps']}; with --tiny: {TINY['steps']})")
    p.add_argument("--repeats", type=arg_type("repeats"), default=None,
                   help=f"timed runs per variant in each process (default: {d['repeats']}; with --tiny: {TINY['repeats']})")
    p.add_argument("--processes", type=arg_type("processes"), default=1, help="fresh worker processes (median and spread)")
    p.add_argument("--breakdown", action="store_true", help="CUPTI profile per variant (first process)")
    p.add_argument("--sizes", action="store_true",
                   help="measure each variant's selection sizes with an extra probe step (one more compile)")
    p.add_argument("--save-hlo", type=Path, default=None, help="folder for the optimised HLO of each profiled step")
    p.add_argument("--policy", default=None, help="policy table for the `auto` variant (default: the committed one)")
    p.add_argument("--write-policy", type=Path, default=None,
                   help="write the measured policy table to this file (replaces only an earlier policy table)")
    p.add_argument("--bw-bytes", type=arg_type("bw_bytes"), default=None,
                   help=f"bytes of the bandwidth probe (default: {d['bw_bytes']}; with --tiny: {TINY['bw_bytes']})")
    p.add_argument("--out", type=Path, default=None, help="folder for JSON / markdown / PNG results")
    t = p.add_argument_group("tensor parallelism (a ('data', 'tensor') mesh over this host's devices)")
    t.add_argument("--tensor", type=arg_type("tensor"), default=None,
                   help="tensor-parallel degree: weights, KV cache and selections split over this many devices")
    t.add_argument("--data", type=arg_type("data"), default=None, help="data-parallel degree: the batch split")
    t.add_argument("--head-topk", choices=HEAD_TOPK, default=DEFAULT_HEAD_TOPK,
                   help="sparse heads on a mesh: k best overall (global) or ceil(k/n) per shard (balanced)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes and sizes for the flags not given: checks the code path on CPU")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="merge the JSON reports of separate runs (fresh processes) instead of measuring")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    for name, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:  # a flag given explicitly is never overridden
            setattr(args, name, value)
    if args.tensor or args.data:
        if "--variants" not in args.argv:
            args.variants = list(MESH_VARIANTS)
        bad = [v for v in args.variants if v not in MESH_VARIANTS]
        if bad:
            raise InputError(f"variants {bad} do not run on a mesh (--tensor/--data): choose from {list(MESH_VARIANTS)}")
        odd = [b for b in args.batches if b % (args.data or 1)]
        if odd:
            raise InputError(f"batch sizes {odd} do not split over --data {args.data}: give multiples of it")
        for flag in ("breakdown", "sizes", "write_policy", "save_hlo"):
            if getattr(args, flag):
                raise InputError(f"--{flag.replace('_', '-')} is single-device only; leave out --tensor/--data")
    # files read and written are checked before any measuring
    if args.policy is not None:
        read_policy(args.policy)
    if args.write_policy is not None:
        check_policy_target(args.write_policy)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder")
    large = [s for s in args.shapes if s in LARGE]
    if large and jax.default_backend() != "gpu" and args.worker is None and not args.merge:
        raise InputError(f"shapes {large} need a GPU (this host has {jax.default_backend()}); use --tiny on CPU")
    return args


def _words(values: list) -> str:
    return " ".join(map(str, values))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        merged = merge_reports(args.merge, args.argv)
        print_table(merged)
        if args.out is not None:
            write_report(merged, args.out)
        if args.write_policy is not None:
            write_policy(args.write_policy, policy_table(merged))
        return 0
    if args.worker:
        Path(args.worker).write_text(json.dumps(worker(args)))
        return 0
    workers = run_processes(args) if args.processes > 1 else [worker(args)]
    merged = merge(workers, args)
    print_table(merged)
    if args.out is not None:
        write_report(merged, args.out)
    if args.write_policy is not None:
        write_policy(args.write_policy, policy_table(merged))
    return 0


if __name__ == "__main__":  # the worker processes (users run `polar-jax bench decode`)
    try:
        sys.exit(main())
    except PolarError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
