"""GPU probe for small-batch decode (issue 10 item 4): the Pallas GEMV against XLA's GEMM fusions on
the projection shapes of a 7B decode step, and the split of the flash-decoding kernel at B=1.

CUPTI kernel time per call (the split-K epilogue included), weights rotated past the 60 MB L2; a
tiling sweep per shape at M=1 (then warps/stages around the best, then M=8 on the best tilings).
Writes <out>/gemv_probe.json and prints a table; stops sweeping after --budget-s seconds.

    PYTHONPATH=. python benchmarks/decode/gemv_probe.py --out $OUT
    PYTHONPATH=. python benchmarks/decode/gemv_probe.py --tiny --out /tmp/p   # code path on CPU
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dense_gemv_triton as tri
from pallas_kernels import selective_attention_triton as attn_tri
from pallas_kernels.dense_gemv_xla import gemv_xla

SHAPES = [  # (label, K, N, layout)
    ("q/k/v/o 4096x4096 kn", 4096, 4096, "kn"),
    ("up 4096->16384 nk (OPT)", 4096, 16384, "nk"),
    ("down 16384->4096 kn (OPT)", 16384, 4096, "kn"),
    ("up/gate 4096->11008 nk (LLaMA)", 4096, 11008, "nk"),
    ("down 11008->4096 kn (LLaMA)", 11008, 4096, "kn"),
]


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def cupti_us(fn, sets) -> float:
    """Median CUPTI kernel time per call (us) of fn over the rotating argument sets."""
    g = jax.jit(lambda s: [fn(*a) for a in s])
    if not on_gpu():
        jax.block_until_ready(g(sets))
        return float("nan")
    from jax.experimental.mosaic.gpu import profiler
    _, t = profiler.measure(g, iterations=10)(sets)
    t = t if isinstance(t, list) else [t]
    return statistics.median(t) * 1e3 / len(sets)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget-s", type=float, default=300.0)
    args = ap.parse_args()
    t_end = time.time() + args.budget_s
    dt = jnp.float32 if args.tiny else jnp.bfloat16
    shapes = [(l, 256, 128 if lay == "kn" else 384, lay) for l, _, _, lay in SHAPES[:2]] if args.tiny else SHAPES
    res = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
           "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "gemv": [],
           "attention": []}
    out_path = os.path.join(args.out, "gemv_probe.json")
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)

    key = jax.random.key(0)
    for label, K, N, lay in shapes:
        nbytes = K * N * 2
        R = 1 if args.tiny else min(8, max(2, -(-200_000_000 // nbytes)))
        ws = [jax.random.normal(jax.random.fold_in(key, i), (K, N) if lay == "kn" else (N, K), dt) for i in range(R)]
        for M in (1, 8):
            xs = [jax.random.normal(jax.random.fold_in(key, 100 + i), (M, K), dt) for i in range(R)]
            sets = list(zip(xs, ws))
            xla = cupti_us(lambda x, w: gemv_xla(x, w, None, None, lay), sets)
            row = {"shape": label, "K": K, "N": N, "layout": lay, "M": M, "bytes": nbytes, "xla_us": xla,
                   "default": tri.choose_gemv_config(M, K, N, lay).__dict__, "configs": []}
            ref = np.asarray(gemv_xla(xs[0], ws[0], None, None, lay), np.float32)

            def trial(cfg):
                if tri.gemv_smem(cfg) > 227 * 1024 or time.time() > t_end:
                    return None
                try:
                    got = np.asarray(tri.gemv(xs[0], ws[0], None, None, lay, config=cfg), np.float32)
                    err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-6))
                    us = cupti_us(lambda x, w: tri.gemv(x, w, None, None, lay, config=cfg), sets)
                except Exception as e:  # a tiling the GPU refuses (registers, smem): record and go on
                    row["configs"].append({**cfg.__dict__, "error": str(e)[:200]})
                    return None
                row["configs"].append({**cfg.__dict__, "us": us, "rel_err": err})
                return us

            def grid(bn, bk, per_sm, warps=4, stages=4):
                bk = min(bk, K)
                n_kb = -(-K // bk)
                want = -(-(per_sm * 132) // -(-N // bn))
                sk = max(d for d in range(1, n_kb + 1) if n_kb % d == 0 and d <= max(1, min(want, n_kb)))
                return tri.GemvConfig(bn, bk, sk, warps, stages)

            if M == 1:
                cands = {grid(bn, bk, p) for bn, bk, p in itertools.product(
                    (16, 32, 64, 128), (256, 512, 1024), (1, 2, 4))}
                if args.tiny:
                    cands = set(list(sorted(cands, key=str))[:3])
                for cfg in sorted(cands, key=str):
                    trial(cfg)
                ok = sorted((c for c in row["configs"] if "us" in c), key=lambda c: c["us"])
                for c in ok[:3]:
                    for warps, stages in itertools.product((4, 8), (3, 4, 6)):
                        cfg = tri.GemvConfig(c["block_n"], c["block_k"], c["split_k"], warps, stages)
                        if cfg.__dict__ not in [{k: v for k, v in d.items() if k in cfg.__dict__} for d in row["configs"]]:
                            trial(cfg)
                best_m1 = sorted((c for c in row["configs"] if "us" in c), key=lambda c: c["us"])[:6]
            else:
                for c in best_m1:
                    trial(tri.GemvConfig(c["block_n"], c["block_k"], c["split_k"], c["num_warps"], c["num_stages"]))
                trial(tri.choose_gemv_config(M, K, N, lay))
            if M == 1:
                trial(tri.choose_gemv_config(M, K, N, lay))
            ok = sorted((c for c in row["configs"] if "us" in c), key=lambda c: c["us"])
            row["best"] = ok[0] if ok else None
            res["gemv"].append(row)
            save()
            if ok:
                b = ok[0]
                print(f"{label:32s} M={M:2d} xla {xla:8.2f} us ({nbytes / xla / 1e6:5.2f} TB/s)  best pallas "
                      f"{b['us']:8.2f} us ({nbytes / b['us'] / 1e6:5.2f} TB/s) bn={b['block_n']} bk={b['block_k']} "
                      f"sk={b['split_k']} w={b['num_warps']} st={b['num_stages']} err={b['rel_err']:.1e} "
                      f"[{len(ok)} tilings]", flush=True)
        del ws

    # flash-decoding split at B=1 (OPT-6.7B layer: 32 heads x 128, context 2048)
    B, S, H, D = (1, 256, 4, 16) if args.tiny else (1, 2048, 32, 128)
    R = 1 if args.tiny else 4
    qs = [jax.random.normal(jax.random.fold_in(key, 500 + i), (B, H, D), dt) for i in range(R)]
    kvs = [(jax.random.normal(jax.random.fold_in(key, 600 + i), (B, S + 64, H, D), dt),
            jax.random.normal(jax.random.fold_in(key, 700 + i), (B, S + 64, H, D), dt)) for i in range(R)]
    lengths = jnp.full((B,), S, jnp.int32)
    groups = jnp.broadcast_to(jnp.arange(H, dtype=jnp.int32), (B, H))
    n_act = jnp.full((B,), H, jnp.int32)
    sets = [(q, k, v) for q, (k, v) in zip(qs, kvs)]
    base = attn_tri.choose_attn_config(B, S + 64, H, D)
    sweep = list(itertools.product((64, 128, 256), (32, 64), (2, 3, 4), (4,)))
    for min_chunk, block_s, stages, warps in sweep[:2] if args.tiny else sweep:
        if time.time() > t_end:
            break
        ns = max(1, min(-(-(S + 64) // min_chunk), 64))
        cfg = attn_tri.AttnConfig(block_s, ns, min_chunk, warps, stages, base.target_programs * 4)
        try:
            us = cupti_us(lambda q, k, v, cfg=cfg: attn_tri.select_decode(q, k, v, lengths, groups, n_act,
                                                                          config=cfg), sets)
        except Exception as e:
            res["attention"].append({**cfg.__dict__, "error": str(e)[:200]})
            continue
        res["attention"].append({**cfg.__dict__, "us": us})
    default_us = cupti_us(lambda q, k, v: attn_tri.select_decode(q, k, v, lengths, groups, n_act, config=base), sets)
    res["attention_default"] = {**base.__dict__, "us": default_us}
    kv_bytes = 2 * B * S * H * D * 2
    ok = sorted((c for c in res["attention"] if "us" in c), key=lambda c: c["us"])
    print(f"attention B=1 S={S}: default {default_us:.2f} us ({kv_bytes / default_us / 1e6:.2f} TB/s)"
          + (f"; best {ok[0]['us']:.2f} us ({kv_bytes / ok[0]['us'] / 1e6:.2f} TB/s) {ok[0]}" if ok else ""))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
