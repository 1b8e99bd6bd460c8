"""Same-run comparison of two versions of the decode step (issue 12: the restructure must not be slower).

Imports polar_jax / pallas_kernels from `--root` (e.g. an unpacked older commit), builds a random-weight
model of a benchmark shape, a random KV cache and (for `heads`) that version's router selector over random
routers, and times `--steps` decode steps in one executable (a device loop, cache donated), `--repeats`
times. Prints one JSON line per variant. Run it once per version in the same device call.

    PYTHONPATH=. python benchmarks/decode/compare_versions.py --root .cmp_old --tag before
    PYTHONPATH=. python benchmarks/decode/compare_versions.py --root . --tag after
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy shape: checks the script on CPU")
    args = ap.parse_args()
    sys.path.insert(0, args.root)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from polar_jax.cache import KVCache
    from polar_jax.config import ModelConfig
    from polar_jax.models import build_model
    from polar_jax.routers.bundle import SparsityBundle
    from polar_jax.routers.config import SparsityConfig
    from polar_jax.routers.sparsify import router_selector

    d, heads_n, hd, layers = (64, 4, 16, 2) if args.tiny else (4096, 32, 128, 32)
    cfg = ModelConfig(model_type="llama", vocab_size=512 if args.tiny else 32000, hidden_size=d,
                      intermediate_size=2 * d if args.tiny else 11008, num_layers=layers, num_heads=heads_n,
                      num_kv_heads=heads_n, head_dim=hd, max_position_embeddings=8448, dtype="bfloat16")
    if args.tiny:
        args.batch, args.context, args.steps, args.repeats = 2, 32, 2, 2
    model = build_model(cfg, dtype=jnp.float32 if args.tiny else jnp.bfloat16)
    graphdef, state = nnx.split(model)
    B, L = args.batch, args.context
    key = jax.random.key(1)
    shape = (B, L + args.steps + 8, heads_n, hd)
    ks, vs = [], []
    for _ in range(cfg.num_layers):
        k1, k2, key = jax.random.split(key, 3)
        ks.append(jax.random.normal(k1, shape, model.dtype))
        vs.append(jax.random.normal(k2, shape, model.dtype))
    cache = KVCache(tuple(ks), tuple(vs), jnp.full((B,), L, jnp.int32))
    rng = np.random.default_rng(0)
    params = {}
    for i in range(1, cfg.num_layers):
        params[f"attn.{i}.w"] = (rng.standard_normal((d, heads_n)) / d**0.5).astype(np.float32)
        params[f"attn.{i}.b"] = np.zeros(heads_n, np.float32)
    plan = SparsityConfig(num_layers=cfg.num_layers, attn_units=heads_n, unit="head", ffn=cfg.intermediate_size,
                          mlp_router=False)
    heads = router_selector(SparsityBundle(plan, params, {}), attn_density=0.5, mlp=False)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, B), jnp.int32)

    # The weights are an argument, not a closure: captured as constants, 13.5 GB of them made every
    # lowering take minutes (the first same-run attempt timed out on it).
    @functools.partial(jax.jit, donate_argnums=(1,))
    def run(state, cache, selector):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            c, _ = carry
            logits, c = m.decode(tokens, c, selector)
            return c, logits.astype(jnp.float32)

        return jax.lax.fori_loop(0, args.steps, body, (cache, jnp.zeros((B, cfg.vocab_size), jnp.float32)))

    def reset(c):
        return type(c)(**{**{f: getattr(c, f) for f in c.__dataclass_fields__}, "lengths": jnp.full((B,), L, jnp.int32)})

    times = {"dense": [], "heads": []}
    for name, sel in (("dense", None), ("heads", heads)):
        cache, logits = run(state, reset(cache), sel)
        logits.block_until_ready()
    for _ in range(args.repeats):
        for name, sel in (("dense", None), ("heads", heads)):
            t = time.perf_counter()
            cache, logits = run(state, reset(cache), sel)
            logits.block_until_ready()
            times[name].append((time.perf_counter() - t) / args.steps)
    for name, ts in times.items():
        print(json.dumps({"tag": args.tag, "variant": name, "step_ms": 1e3 * statistics.median(ts),
                          "all_ms": [round(1e3 * t, 3) for t in ts], "device": jax.devices()[0].device_kind,
                          "jax": jax.__version__, "batch": B, "context": L}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
