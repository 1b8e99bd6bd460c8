"""Dense decode-step benchmark against the memory roofline.

A model of real dimensions with random bf16 weights (LLaMA-2-7B, LLaMA-3.1-8B shapes), a KV cache filled
with random values holding `--context` tokens per sequence, and the jitted decode step (cache donated)
timed over back-to-back steps. The roofline is the bytes one step must read (all weights except the unused
embedding rows, plus the live KV of every sequence) over the HBM bandwidth measured in the same run.

    PYTHONPATH=. python -m polar_jax.bench.decode_bench --out benchmarks/results     # on a GPU
    python -m polar_jax.bench.decode_bench --tiny                                    # code path check on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.cache import KVCache
from polar_jax.config import ModelConfig, RopeConfig
from polar_jax.decode import decode_step, split_model
from polar_jax.models import build_model

SHAPES = {
    "llama2-7b": ModelConfig(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096, dtype="bfloat16",
    ),
    "llama3.1-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072, dtype="bfloat16",
        rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
    ),
    "tiny": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, dtype="float32",
    ),
}


def _loop_time(fn, x, reps: int) -> float:
    """Seconds per call over `reps` back-to-back calls (one sync at the end), after ~0.5 s of warm-up so
    the GPU clocks have ramped up (a cold card runs its first milliseconds far below full speed)."""
    fn(x).block_until_ready()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.5:
        fn(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        y = fn(x)
    y.block_until_ready()
    return (time.perf_counter() - t) / reps


def measure_bandwidth(nbytes: int = 4 << 30, reps: int = 20) -> dict[str, float]:
    """HBM bandwidth in bytes/s two ways: an elementwise copy (bytes read + bytes written) and a full
    reduction (bytes read only, closer to a decode step, which almost only reads)."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)  # a plain copy could be elided; this reads and writes every element
    read = jax.jit(lambda a: jnp.sum(a))
    return {"copy_Bps": 2 * x.nbytes / _loop_time(copy, x, reps), "read_Bps": x.nbytes / _loop_time(read, x, reps)}


def step_bytes(cfg: ModelConfig, batch: int, context: int, itemsize: int) -> dict[str, int]:
    d, n, hq, hkv, hd, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim, cfg.num_layers)
    per_layer = d * hq * hd * 2 + d * hkv * hd * 2 + 3 * d * n + 2 * d
    weights = (L * per_layer + d + cfg.vocab_size * d + batch * d) * itemsize  # head read whole, embed rows only
    kv = 2 * L * batch * context * hkv * hd * itemsize
    return {"weights": weights, "kv": kv, "total": weights + kv}


def random_cache(cfg: ModelConfig, batch: int, capacity: int, context: int, dtype) -> KVCache:
    key = jax.random.key(1)
    shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    ks, vs = [], []
    for i in range(cfg.num_layers):
        k1, k2, key = jax.random.split(key, 3)
        ks.append(jax.random.normal(k1, shape, dtype))
        vs.append(jax.random.normal(k2, shape, dtype))
    return KVCache(tuple(ks), tuple(vs), jnp.full((batch,), context, jnp.int32))


def time_decode(model, batch: int, context: int, attn_impl: str, steps: int, repeats: int) -> dict:
    cfg = model.config
    capacity = context + steps * (repeats + 1) + 8
    graphdef, state = split_model(model)
    cache = random_cache(cfg, batch, capacity, context, model.dtype)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, batch), jnp.int32)
    t0 = time.perf_counter()
    logits, cache = decode_step(graphdef, state, cache, tokens, None, attn_impl)
    first_logits = np.asarray(logits.astype(jnp.float32))  # same seeded cache for every impl: comparable
    compile_s = time.perf_counter() - t0
    for _ in range(steps):  # warm-up
        logits, cache = decode_step(graphdef, state, cache, tokens, None, attn_impl)
    logits.block_until_ready()
    per_step = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            logits, cache = decode_step(graphdef, state, cache, tokens, None, attn_impl)
        logits.block_until_ready()
        per_step.append((time.perf_counter() - t) / steps)
    assert bool(jnp.all(jnp.isfinite(logits))), "non-finite logits"
    del cache
    return {"step_s": statistics.median(per_step), "step_s_all": per_step, "compile_s": compile_s,
            "first_logits": first_logits}


def run(args: argparse.Namespace) -> dict:
    dev = jax.devices()[0]
    results = {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "-m", "polar_jax.bench.decode_bench", *sys.argv[1:]]),
        "host": platform.node(),
        "context": args.context,
        "rows": [],
    }
    bws = measure_bandwidth(args.bw_bytes)
    bw = max(bws.values())  # the higher ceiling: the roofline fraction is then a conservative number
    results.update(copy_bandwidth_Bps=bws["copy_Bps"], read_bandwidth_Bps=bws["read_Bps"], bandwidth_Bps=bw)
    print(f"device {results['device']}, jax {jax.__version__}, copy {bws['copy_Bps'] / 1e12:.2f} TB/s, "
          f"read {bws['read_Bps'] / 1e12:.2f} TB/s", flush=True)
    reference_logits: dict = {}
    for shape in args.shapes:
        cfg = SHAPES[shape]
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        model = build_model(cfg, dtype=dtype)
        for impl in args.attn_impls:
            for batch in args.batches:
                try:
                    t = time_decode(model, batch, args.context, impl, args.steps, args.repeats)
                except Exception as e:  # keep the other rows: one failing configuration is a finding, not a crash
                    print(f"{shape} {impl} B={batch}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    results["rows"].append({"shape": shape, "attn_impl": impl, "batch": batch, "error": str(e)[:2000]})
                    continue
                first = t.pop("first_logits")
                ref = reference_logits.setdefault((shape, batch), first)  # the first impl listed is the reference
                t["max_abs_logit_diff_vs_first_impl"] = float(np.max(np.abs(first - ref)))
                t["logit_scale"] = float(np.max(np.abs(ref)))
                b = step_bytes(cfg, batch, args.context, jnp.dtype(dtype).itemsize)
                floor = b["total"] / bw
                row = {
                    "shape": shape, "attn_impl": impl, "batch": batch, **t,
                    "tokens_per_s": batch / t["step_s"], "bytes": b, "roofline_s": floor,
                    "roofline_fraction": floor / t["step_s"], "achieved_Bps": b["total"] / t["step_s"],
                }
                results["rows"].append(row)
                print(f"{shape:12s} {impl:6s} B={batch:4d}  step {t['step_s'] * 1e3:8.3f} ms  "
                      f"{row['tokens_per_s']:9.1f} tok/s  roofline {floor * 1e3:7.3f} ms  "
                      f"= {100 * row['roofline_fraction']:5.1f}%  (compile {t['compile_s']:.1f}s, "
                      f"logit diff {t['max_abs_logit_diff_vs_first_impl']:.3g} of {t['logit_scale']:.3g})", flush=True)
        del model
    return results


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode_dense_{results['date']}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# Dense decode step vs memory roofline ({results['device']})",
        "",
        f"jax {results['jax_version']}, {results['date']}, context {results['context']} cached tokens per sequence, "
        f"random bf16 weights and KV. Measured bandwidth: copy {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s "
        f"(read + write counted), read-only reduction {results['read_bandwidth_Bps'] / 1e12:.2f} TB/s. "
        "Roofline = (weights + live KV bytes) / the higher of the two. Attention `xla` = einsum over the cache, "
        "`pallas` = the select_decode kernel with every KV group active.",
        "",
        f"Command: `{results['command']}`",
        "",
        "| shape | attention | B | step (ms) | tokens/s | bytes/step (GB) | roofline (ms) | % of roofline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['attn_impl']} | {r['batch']} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['attn_impl']} | {r['batch']} | {r['step_s'] * 1e3:.3f} | {r['tokens_per_s']:.1f} | "
            f"{r['bytes']['total'] / 1e9:.2f} | {r['roofline_s'] * 1e3:.3f} | {100 * r['roofline_fraction']:.1f}% |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for shape, impl in sorted({(r["shape"], r["attn_impl"]) for r in results["rows"]}):
            rows = [r for r in results["rows"] if r["shape"] == shape and r["attn_impl"] == impl and "error" not in r]
            ax.plot([r["batch"] for r in rows], [100 * r["roofline_fraction"] for r in rows], "o-", label=f"{shape} ({impl})")
        ax.axhline(80, color="gray", ls="--", label="goal 80%")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("% of memory roofline")
        ax.set_ylim(0, 105)
        ax.set_title(f"Dense decode step, {results['context']} cached tokens, {results['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="polar-jax bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3.1-8b"], choices=sorted(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--attn-impls", nargs="+", default=["xla"], choices=["xla", "pallas", "auto"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bw-bytes", type=int, default=4 << 30)
    p.add_argument("--out", type=Path, default=None, help="folder for JSON/markdown/PNG results")
    p.add_argument("--tiny", action="store_true", help="tiny shape, small sizes: checks the code path on CPU")
    args = p.parse_args(argv)
    if args.tiny:
        args.shapes, args.batches, args.context, args.steps, args.repeats, args.bw_bytes = (
            ["tiny"], [1, 4], 64, 2, 2, 1 << 20)
    results = run(args)
    if args.out is not None:
        write_report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
