"""Global vs balanced top-k heads under tensor parallelism: accuracy and shard imbalance (issue 15, item 4).

A per-sequence top-k over all attention units (heads, or KV groups for GQA) can put more of a batch's
active units on one "tensor" shard than on another, and the slowest shard sets the step time. Balanced
top-k keeps ceil(k/n) units on each of the n shards instead. Balance changes only *which* units are kept,
so both are measured here on one device (CPU), with the masked evaluation that the decode path is tested
to match (tests/test_tensor_parallel.py):

- perplexity on WikiText-2 test (256-token windows, heads sparse, MLP dense: balance does not touch the
  MLP) for global top-k and for balanced top-k at TP degrees 2 and 4, at attention densities 0.5 and 0.3;
- imbalance of global top-k: per decode batch of B rows (random rows of the test windows' router
  inputs), the slowest shard's active (row, unit) pairs over the mean shard's, for B in {1, 8, 32}.
  Balanced top-k is 1.0 by construction (checked here too).

    python benchmarks/accuracy/tp_balance.py --bundle tiny-llama=/tmp/acc/bundle_tiny-llama \\
        --bundle tiny-opt=/tmp/acc/bundle_tiny-opt          # polar-tiny-opt uses the committed default

writes benchmarks/results/tp_balance.json and tp_balance.md, and states which default the data picks
(`polar_jax.tensor_parallel.DEFAULT_HEAD_TOPK` is set from it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path("/work/shared") if Path("/work/shared").exists() else REPO.parent / "shared"
MODELS = ("polar-tiny-opt", "tiny-opt", "tiny-llama")
DENSITIES = (0.5, 0.3)
DEGREES = (2, 4)
BATCHES = (1, 8, 32)
# the decision rule: balanced is the default when it costs at most this much perplexity anywhere measured
# and global top-k is measurably unbalanced at decode batch sizes (B >= 8)
PPL_TOLERANCE = 0.01
IMBALANCE_FLOOR = 1.05


def imbalance(bundle, router_inputs: np.ndarray, rho: float, shards: int, rng: np.random.Generator) -> dict:
    """Global and balanced top-k imbalance per batch size (mean, p95, max over batches and layers)."""
    import jax.numpy as jnp

    from polar_jax.routers.config import units_kept
    from polar_jax.selection import balanced_unit_mask, shard_budget, unit_mask
    from polar_jax.tensor_parallel import shard_imbalance

    c = bundle.config
    k = units_kept(rho, c.attn_units)
    out: dict = {"k": k, "balanced_units_kept": shards * min(shard_budget(k, shards), c.attn_units // shards)}
    for rule in ("global", "balanced"):
        per_b = {}
        for b in BATCHES:
            vals = []
            for layer in range(1, c.num_layers):
                logits = jnp.asarray(bundle.attn_logits(layer, router_inputs[layer]))  # [N, U]
                if rule == "global":
                    keep = unit_mask(logits, k)
                else:
                    keep = balanced_unit_mask(logits, min(shard_budget(k, shards), c.attn_units // shards), shards)
                keep = np.asarray(keep) > 0
                n = (len(keep) // b) * b
                batches = keep[rng.permutation(len(keep))[:n]].reshape(n // b, b, -1)
                vals.append(shard_imbalance(batches, shards))
            v = np.concatenate(vals)
            per_b[str(b)] = {"mean": float(v.mean()), "p95": float(np.percentile(v, 95)), "max": float(v.max())}
        out[rule] = per_b
    return out


def run_model(name: str, bundle_path: str, max_tokens: int) -> dict:
    import jax
    import jax.numpy as jnp

    import polar_jax
    from polar_jax.eval.perplexity import make_windows, perplexity
    from polar_jax.models.collect import forward_with_stats
    from polar_jax.routers import load_sparsity, router_sparsifier
    from polar_jax.routers.collect import read_text_tokens

    model, tok = polar_jax.load_hf(SHARED / "models" / name, dtype="float32")
    bundle = load_sparsity(bundle_path, model)
    c = bundle.config
    ids = read_text_tokens(tok, [SHARED / "data" / "wikitext-2" / "test.txt"])[0]
    t0 = time.time()
    rows = []

    def ppl(label: str, sparsifier, **info) -> float:
        r = perplexity(model, ids, 256, 8, max_tokens=max_tokens, sparsifier=sparsifier, progress=False)
        rows.append({"label": label, "ppl": r.ppl, "tokens": r.tokens, **info})
        print(f"{name} {label} {info}: ppl {r.ppl:.3f} ({time.time() - t0:.0f}s)", flush=True)
        return r.ppl

    dense = ppl("dense", None)
    for rho in DENSITIES:
        ppl("global top-k", router_sparsifier(bundle, rho, None, mlp=False), attn_density=rho, shards=1)
        for n in DEGREES:
            ppl("balanced top-k", router_sparsifier(bundle, rho, None, mlp=False, balance=n), attn_density=rho,
                shards=n)

    windows = make_windows(ids, 256, max_tokens)[:16]  # 4096 positions of router input per layer
    _, stats = forward_with_stats(model, jnp.asarray(windows))
    router_inputs = np.asarray(stats["router_input"], np.float32).reshape(c.num_layers, -1, model.config.hidden_size)
    rng = np.random.default_rng(0)
    imb = {f"{rho}/{n}": imbalance(bundle, router_inputs, rho, n, rng) for rho in DENSITIES for n in DEGREES}
    return {"model": name, "bundle": str(bundle_path), "units": c.attn_units, "unit": c.unit,
            "layers": model.config.num_layers, "dense_ppl": dense, "ppl": rows, "imbalance": imb,
            "eval": {"text": "wikitext-2/test.txt", "max_tokens": max_tokens, "seq_len": 256, "batch": 8,
                     "imbalance_positions": int(router_inputs.shape[1])},
            "env": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
                    "date": datetime.date.today().isoformat(), "seconds": round(time.time() - t0)}}


def provenance(models: list[dict]) -> dict:
    """Device, jax version and date of the run, from each model's environment (one value, or each joined)."""
    def joined(values) -> str:
        return "; ".join(dict.fromkeys(values))

    return {"device": joined(m["env"]["backend"].upper() for m in models),
            "jax": joined(m["env"]["jax"] for m in models), "date": joined(m["env"]["date"] for m in models)}


def decide(models: list[dict]) -> dict:
    """The default from the data (rule in the module constants)."""
    worst_cost, worst_at, more_units = 0.0, None, []
    for m in models:
        glob = {r["attn_density"]: r["ppl"] for r in m["ppl"] if r["label"] == "global top-k"}
        for r in m["ppl"]:
            if r["label"] != "balanced top-k":
                continue
            imb = m["imbalance"][f"{r['attn_density']}/{r['shards']}"]
            at = f"{m['model']} rho={r['attn_density']} TP={r['shards']}"
            if imb["balanced_units_kept"] > imb["k"]:  # n does not divide k: more units, not comparable
                more_units.append(at)
                continue
            cost = r["ppl"] / glob[r["attn_density"]] - 1
            if cost > worst_cost:
                worst_cost, worst_at = cost, at
    imb = [v["global"][b]["mean"] for m in models for v in m["imbalance"].values() for b in ("8", "32")]
    mean_imb = float(np.mean(imb))
    choice = "balanced" if worst_cost <= PPL_TOLERANCE and mean_imb >= IMBALANCE_FLOOR else "global"
    return {"default": choice, "worst_balanced_ppl_cost": worst_cost, "worst_at": worst_at,
            "balanced_keeps_more_units_at": more_units,
            "mean_global_imbalance_B8_B32": mean_imb, "ppl_tolerance": PPL_TOLERANCE,
            "imbalance_floor": IMBALANCE_FLOOR}


def markdown(models: list[dict], decision: dict) -> str:
    lines = ["# Global vs balanced top-k heads under tensor parallelism (CPU, masked evaluation)", "",
             "Made by `benchmarks/accuracy/tp_balance.py` (see its docstring). Perplexity: WikiText-2 test, "
             "256-token windows, heads sparse by the trained routers, MLP dense. Balanced top-k at TP degree n "
             "keeps ceil(k/n) units on each of the n shards (n*ceil(k/n) in all, at most all of them). "
             "Imbalance: per decode batch, the slowest shard's active (row, unit) pairs over the mean shard's "
             "(1.0 = even; the slowest shard sets the attention time of a TP step).", ""]
    for m in models:
        lines += [f"## {m['model']} ({m['units']} attention units = {m['unit']}s, {m['layers']} layers; "
                  f"dense perplexity {m['dense_ppl']:.2f})", "",
                  "| density | k | global ppl | balanced TP=2 ppl (units) | balanced TP=4 ppl (units) |"
                  " global imbalance TP=2, B=1/8/32 | global imbalance TP=4, B=1/8/32 |"
                  " slowest shard's work, global / balanced, B=32, TP=2 / TP=4 |",
                  "|---|---|---|---|---|---|---|---|"]
        for rho in DENSITIES:
            g = next(r["ppl"] for r in m["ppl"] if r["label"] == "global top-k" and r["attn_density"] == rho)
            cells = []
            for n in DEGREES:
                b = next(r["ppl"] for r in m["ppl"] if r["label"] == "balanced top-k" and r["attn_density"] == rho
                         and r["shards"] == n)
                cells.append(f"{b:.2f} ({m['imbalance'][f'{rho}/{n}']['balanced_units_kept']})")
            imbs = []
            for n in DEGREES:
                v = m["imbalance"][f"{rho}/{n}"]["global"]
                imbs.append(" / ".join(f"{v[str(b)]['mean']:.2f}" for b in BATCHES))
            k = m["imbalance"][f"{rho}/2"]["k"]
            # global: the mean shard has k/n units per row, the slowest `imbalance` times that; balanced:
            # every shard has units_kept/n
            work = [m["imbalance"][f"{rho}/{n}"]["global"]["32"]["mean"] * k
                    / m["imbalance"][f"{rho}/{n}"]["balanced_units_kept"] for n in DEGREES]
            lines.append(f"| {rho} | {k} | {g:.2f} | {cells[0]} | {cells[1]} | {imbs[0]} | {imbs[1]} | "
                         f"{work[0]:.2f} / {work[1]:.2f} |")
        bal = [m["imbalance"][key]["balanced"][str(b)]["max"] for key in m["imbalance"] for b in BATCHES]
        lines += ["", f"Balanced top-k imbalance, worst batch: {max(bal):.2f} (1.00 by construction).", ""]
    d = decision
    lines += ["## Default", "",
              f"Rule: balanced when, at equal kept units (n divides k), it costs at most "
              f"{100 * d['ppl_tolerance']:.0f} % perplexity against global top-k everywhere measured, and global "
              f"top-k's mean imbalance at B = 8 and 32 is at least {d['imbalance_floor']:.2f}.", "",
              f"Measured: the largest perplexity cost of balanced at equal units is "
              f"{100 * d['worst_balanced_ppl_cost']:.2f} % ({d['worst_at'] or 'none: balanced is never worse'}); "
              f"the mean imbalance of global top-k at B = 8 and 32 is {d['mean_global_imbalance_B8_B32']:.3f}. "
              f"Where n does not divide k ({', '.join(d['balanced_keeps_more_units_at']) or 'nowhere'}), "
              "balanced keeps more units than global: better perplexity for more attention work (the last "
              "column says whether its slowest shard still does less than global's).", "",
              f"**Default: `head_topk=\"{d['default']}\"`** (`polar_jax.tensor_parallel.DEFAULT_HEAD_TOPK`).", "",
              "Speed is not measured here (no multi-GPU machine was lent): at a TP step the attention time "
              "scales with the slowest shard's load, i.e. by the imbalance above for global top-k, while "
              "balanced top-k keeps n*ceil(k/n) >= k units (more work when n does not divide k). "
              "benchmarks/decode/tp_bench.py measures both on GPUs.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", default=[], metavar="MODEL=PATH",
                   help="trained router bundle per shared model (polar-tiny-opt: the committed default)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--from-json", type=Path, default=None, help="rewrite the markdown from a saved JSON report")
    args = p.parse_args()
    if args.from_json is not None:
        models = json.loads(args.from_json.read_text())["models"]
        decision = decide(models)
        report = {"models": models, "decision": decision, **provenance(models),
                  "command": json.loads(args.from_json.read_text())["command"]}
        (args.out / "tp_balance.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "tp_balance.md").write_text(markdown(models, decision))
        print(markdown(models, decision))
        return
    bundles = {"polar-tiny-opt": "default", **dict(b.split("=", 1) for b in args.bundle)}
    missing = [m for m in args.models if m not in bundles]
    if missing:
        sys.exit(f"no router bundle for {missing}: pass --bundle MODEL=PATH (see benchmarks/accuracy/README.md)")
    models = [run_model(m, bundles[m], args.max_tokens) for m in args.models]
    decision = decide(models)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"models": models, "decision": decision, **provenance(models), "command": " ".join(sys.argv)}
    (args.out / "tp_balance.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "tp_balance.md").write_text(markdown(models, decision))
    print(markdown(models, decision))


if __name__ == "__main__":
    main()
