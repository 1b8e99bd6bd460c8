"""Compile time and run time of the layer loop unrolled vs under `lax.scan` over stacked weights (issue 12),
and `generate`'s decoding rate against 1 / decode-step time (issue 10, item 4), on a 32-layer shape.

Each worker is a fresh process (XLA's autotuning and the clocks differ between processes): it builds the
shape with random weights, then for each program (prefill into a cache; one dense decode step, cache donated)
lowers and compiles it unrolled and scanned (`CausalLM.stack_layers`), timing `lower` and `compile` apart,
and times the compiled program. Then `generate` at two lengths: the difference of the two wall times over
the difference of the steps is its per-step time, set against the decode step timed in a device loop at the
same cache size. The driver runs `--processes` workers one after another and writes JSON + markdown + PNG.

    PYTHONPATH=. python benchmarks/decode/scan_compile.py --out DIR            # GPU
    PYTHONPATH=. python benchmarks/decode/scan_compile.py --tiny --out DIR     # CPU: checks the script
    python benchmarks/decode/scan_compile.py --report DIR                      # rewrite md + png from JSON
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _median_ms(fn, reps: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ts), [round(t, 3) for t in ts]


def worker(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import polar_jax
    from polar_jax.bench.shapes import SHAPES
    from polar_jax.bench.synthetic import random_cache
    from polar_jax.cache import KVCache
    from polar_jax.models import build_model

    cfg = SHAPES[args.shape]
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    model = build_model(cfg, dtype=dtype)
    graphdef, state = nnx.split(model)
    stacked = model.stack_layers()
    rng = np.random.default_rng(0)
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax_version": jax.__version__,
           "pid": os.getpid(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "shape": args.shape, "num_layers": cfg.num_layers, "dtype": cfg.dtype, "programs": [], "generate": []}
    print(f"[{os.getpid()}] {out['device']} jax {jax.__version__} {args.shape}", flush=True)

    def compile_and_time(name: str, fn, make_args, reps: int, extra: dict) -> None:
        for layout, st in (("unrolled", None), ("scanned", stacked)):
            t0 = time.perf_counter()
            lowered = fn.lower(*make_args(), st)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()

            def call():
                jax.block_until_ready(compiled(*make_args(), st))

            call()  # first run (allocations) untimed
            ms, all_ms = _median_ms(call, reps)
            row = {"program": name, "layout": layout, "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
                   "run_ms": round(ms, 3), "run_all_ms": all_ms, **extra}
            out["programs"].append(row)
            print(f"  {name:8s} {layout:8s} lower {row['lower_s']:7.2f} s compile {row['compile_s']:7.2f} s "
                  f"run {ms:9.3f} ms", flush=True)

    # prefill: B x T prompts into an empty cache (what generate runs first)
    b, t = args.prefill_batch, args.prefill_len
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    lengths = jnp.full((b,), t, jnp.int32)
    prefill = jax.jit(lambda state, toks, lengths, cache, st: nnx.merge(graphdef, state).prefill(
        toks, lengths, cache, stacked=st))
    compile_and_time("prefill", prefill,
                     lambda: (state, toks, lengths, KVCache.create(cfg, b, t + 64, dtype)), args.reps,
                     {"batch": b, "tokens": t})
    # one dense decode step, cache donated (the programs generate and the benchmark run)
    b, ctx = args.decode_batch, args.context
    cache_box = [random_cache(cfg, b, ctx + 4 * args.reps + 16, ctx, dtype)]
    tok1 = jnp.asarray(rng.integers(0, cfg.vocab_size, (b,)), jnp.int32)
    step = jax.jit(lambda state, cache, tok, st: nnx.merge(graphdef, state).decode(tok, cache, stacked=st),
                   donate_argnums=(1,))

    def step_args():
        return state, cache_box[0], tok1

    def stepped(*a):  # keeps the donated cache for the next call
        logits, cache_box[0] = step(*a)
        return logits

    for layout, st in (("unrolled", None), ("scanned", stacked)):
        t0 = time.perf_counter()
        lowered = step.lower(*step_args(), st)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        stepped(*step_args(), st).block_until_ready()
        ms, all_ms = _median_ms(lambda: stepped(*step_args(), st).block_until_ready(), args.reps)
        row = {"program": "decode", "layout": layout, "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
               "run_ms": round(ms, 3), "run_all_ms": all_ms, "batch": b, "context": ctx}
        out["programs"].append(row)
        print(f"  decode   {layout:8s} lower {row['lower_s']:7.2f} s compile {row['compile_s']:7.2f} s "
              f"run {ms:9.3f} ms", flush=True)
    del cache_box[0]

    # generate's per-step time vs the decode step in a device loop at the same cache size
    for gb in args.generate_batches:
        prompts = rng.integers(0, cfg.vocab_size, (gb, args.gen_prompt)).tolist()
        walls = {}
        for n in (args.gen_short, args.gen_long):
            polar_jax.generate(model, prompts, n, eos_token_id=[])  # compile
            ms, all_ms = _median_ms(lambda: polar_jax.generate(model, prompts, n, eos_token_id=[]), 3)
            walls[n] = ms
        gen_step_ms = (walls[args.gen_long] - walls[args.gen_short]) / (args.gen_long - args.gen_short)
        capacity = -(-(args.gen_prompt + args.gen_long) // 64) * 64  # generate's cache bucket
        mid = args.gen_prompt + (args.gen_short + args.gen_long) // 2
        steps = 32

        @functools.partial(jax.jit, donate_argnums=(1,))
        def loop(state, cache, tok):
            m = nnx.merge(graphdef, state)

            def body(_, carry):
                c, _ = carry
                logits, c = m.decode(tok, c)
                return c, logits.astype(jnp.float32)

            return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((gb, cfg.vocab_size), jnp.float32)))

        box = [random_cache(cfg, gb, capacity, mid - steps // 2, dtype)]

        def run_loop():
            box[0], logits = loop(state, box[0], prompts_tok)
            box[0] = KVCache(box[0].k, box[0].v, jnp.full((gb,), mid - steps // 2, jnp.int32), box[0].live)
            logits.block_until_ready()

        prompts_tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (gb,)), jnp.int32)
        run_loop()
        loop_ms, _ = _median_ms(run_loop, 5)
        step_ms = loop_ms / steps
        row = {"batch": gb, "prompt": args.gen_prompt, "short": args.gen_short, "long": args.gen_long,
               "generate_wall_ms": {str(k): round(v, 3) for k, v in walls.items()},
               "generate_step_ms": round(gen_step_ms, 4), "device_loop_step_ms": round(step_ms, 4),
               "generate_rate_vs_step": round(step_ms / gen_step_ms, 4), "capacity": capacity}
        out["generate"].append(row)
        print(f"  generate B={gb}: {gen_step_ms:.3f} ms/step vs device loop {step_ms:.3f} ms "
              f"-> {100 * step_ms / gen_step_ms:.1f} % of 1/step", flush=True)
        del box[0]
    return out


# ---- driver and report --------------------------------------------------------------------------------
def _argv_for_worker(args: argparse.Namespace, path: Path) -> list[str]:
    keep = []
    for k in ("shape", "prefill_batch", "prefill_len", "decode_batch", "context", "reps", "gen_prompt", "gen_short",
              "gen_long"):
        keep += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    keep += ["--generate-batches", *map(str, args.generate_batches)]
    return [sys.executable, str(HERE), *keep, "--worker-json", str(path)]


def summarise(runs: list[dict]) -> dict:
    rows = {}
    for run in runs:
        for r in run["programs"]:
            key = (r["program"], r["layout"])
            rows.setdefault(key, {k: r[k] for k in r if k not in ("lower_s", "compile_s", "run_ms", "run_all_ms")})
            for f in ("lower_s", "compile_s", "run_ms"):
                rows[key].setdefault(f, []).append(r[f])
    programs = []
    for (prog, layout), r in rows.items():
        r = dict(r)
        for f in ("lower_s", "compile_s", "run_ms"):
            vals = r.pop(f)
            r[f] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        programs.append(r)
    gens = {}
    for run in runs:
        for g in run["generate"]:
            gens.setdefault(g["batch"], []).append(g["generate_rate_vs_step"])
    generate = [{"batch": b, "rate_vs_step": {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}}
                for b, v in sorted(gens.items())]
    return {"programs": programs, "generate": generate}


def write_report(out_dir: Path, result: dict) -> None:
    s = result["summary"]
    meta = result["meta"]
    lines = [f"# Layer loop unrolled vs `lax.scan` (compile and run), and generate vs the decode step", "",
             f"- device: {meta['device']}; jax {meta['jax_version']}; {meta['date']}; {meta['processes']} fresh "
             f"process(es); shape {meta['shape']} ({meta['num_layers']} layers, random {meta['dtype']} weights)",
             f"- command: `{meta['command']}`", "",
             "| program | layout | lower (s) | compile (s) | run (ms) | compile: scanned / unrolled | run: scanned / unrolled |",
             "|---|---|---|---|---|---|---|"]
    by = {(p["program"], p["layout"]): p for p in s["programs"]}

    def fmt(d: dict, digits: int) -> str:
        return f"{d['median']:.{digits}f} ({d['min']:.{digits}f}-{d['max']:.{digits}f})"

    for (prog, layout), p in by.items():
        base = by[(prog, "unrolled")]
        rc = p["compile_s"]["median"] / base["compile_s"]["median"]
        rr = p["run_ms"]["median"] / base["run_ms"]["median"]
        what = ", ".join(f"{k} {p[k]}" for k in ("batch", "tokens", "context") if k in p)
        lines.append(f"| {prog} ({what}) | {layout} | {fmt(p['lower_s'], 2)} | {fmt(p['compile_s'], 2)} | "
                     f"{fmt(p['run_ms'], 3)} | {rc:.2f} | {rr:.2f} |")
    lines += ["", "Median (min-max) over the processes. Compile includes XLA's autotuning.", "",
              "| generate batch | generate's decoding rate / (1 / device-loop step), median (min-max) | >= 0.95 |",
              "|---|---|---|"]
    for g in s["generate"]:
        r = g["rate_vs_step"]
        lines.append(f"| {g['batch']} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) | "
                     f"{'met' if r['median'] >= 0.95 else 'missed'} |")
    (out_dir / "scan_compile.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    progs = sorted({p for p, _ in by})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, field, label in ((axes[0], "compile_s", "compile time (s)"), (axes[1], "run_ms", "run time (ms)")):
        for j, layout in enumerate(("unrolled", "scanned")):
            vals = [by[(p, layout)][field]["median"] for p in progs]
            ax.bar([i + 0.38 * j for i in range(len(progs))], vals, width=0.38, label=layout)
        ax.set_xticks([i + 0.19 for i in range(len(progs))], progs)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{meta['shape']}, {meta['device']}: layer loop unrolled vs lax.scan")
    fig.tight_layout()
    fig.savefig(out_dir / "scan_compile.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--prefill-batch", type=int, default=1)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--generate-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--gen-prompt", type=int, default=128)
    ap.add_argument("--gen-short", type=int, default=32)
    ap.add_argument("--gen-long", type=int, default=160)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny-llama shape and sizes: checks the script on CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None, help="rewrite the markdown and PNG from DIR/scan_compile.json")
    ap.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        d = Path(args.report)
        write_report(d, json.loads((d / "scan_compile.json").read_text()))
        return 0
    if args.worker_json:
        Path(args.worker_json).write_text(json.dumps(worker(args), indent=1))
        return 0
    if args.tiny:
        args.shape, args.prefill_len, args.decode_batch, args.context, args.reps = "tiny-llama", 16, 2, 32, 2
        args.generate_batches, args.gen_prompt, args.gen_short, args.gen_long, args.processes = [2], 8, 4, 12, 1
    if not args.out:
        ap.error("--out DIR is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(args.processes):
        path = out / f"scan_compile_worker{i}.json"
        subprocess.run(_argv_for_worker(args, path), check=True)
        runs.append(json.loads(path.read_text()))
    import jax
    meta = {"device": runs[0]["device"], "jax_version": runs[0]["jax_version"], "shape": args.shape,
            "num_layers": runs[0]["num_layers"], "dtype": runs[0]["dtype"], "processes": len(runs),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "backend": jax.default_backend()}
    result = {"meta": meta, "summary": summarise(runs), "runs": runs}
    (out / "scan_compile.json").write_text(json.dumps(result, indent=1))
    write_report(out, result)
    print((out / "scan_compile.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
