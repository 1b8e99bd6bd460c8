"""Router perplexity on SmolLM2 with routers trained for the density they serve (labels = the top-k units at
that k), against the committed results of the same text, windows and tokens (`accuracy_smollm2.json`: its
routers are trained at one density per unit kind and used at all of them).

    PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_per_density.py \
        --point group:1:3:/tmp/acc4/g1_h64 --point group:1:3:/tmp/acc4/g1_lin \
        --point head:6:9:/tmp/acc4/h6_h64 --point head:4:9:/tmp/acc4/h4_h64

The bundles come from `polar-jax train-routers ... --attn-train-density` (benchmarks/accuracy/smollm2.md).
A bundle with several attention-router sets is evaluated with the set its rule picks for the density (the
run records that set's training density). `--out` writes another JSON (default the one above); with
`--resume` the runs already in it are kept and a point whose label is there is skipped. A point may end
with `:LABEL` (default: the bundle folder's name), the name of its configuration in the JSON. `--merge F`
adds the runs (and the env, "; "-joined) of another result JSON of this script, e.g. of a run made at the
same time into another file.

`--adaptive` evaluates the points with input-adaptive head budgets instead (each token keeps the units whose
router logit passes the layer's calibrated threshold, clipped to [k/2, 2k]; thresholds set so that the mean
on the calibration data is k): the run records the mean fraction of units actually kept on the evaluated
tokens (`kept_mean`, over the sparse layers), since the oracle it is compared with keeps exactly k.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = Path(__file__).resolve().parents[1] / "results" / "accuracy_smollm2_per_density.json"


class KeptCounter:
    """Counts the head units the masked evaluation keeps: wraps the sparsifier's mask rule
    (`sparsify.unit_mask`) with a host callback that adds up kept units and scored tokens (every call is a
    sparse layer of one window)."""

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        from polar_jax.routers import sparsify

        rule = sparsify.unit_mask

        def counting(scores, counts):
            mask = rule(scores, counts)
            jax.debug.callback(self._add, jnp.sum(mask), jnp.asarray(mask.size, jnp.float32))
            return mask

        sparsify.unit_mask = counting
        self.reset()

    def _add(self, units, slots) -> None:
        self.units += float(units)
        self.slots += float(slots)

    def reset(self) -> None:
        self.units = self.slots = 0.0

    def mean(self) -> float:
        """Mean fraction of units kept per token and sparse layer."""
        if not self.slots:
            raise RuntimeError("no head mask was computed: is the evaluation sparse?")
        return self.units / self.slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", action="append", default=[], help="unit:k:units:bundle folder[:label]")
    ap.add_argument("--merge", action="append", default=[], help="another result JSON whose runs to add")
    ap.add_argument("--out", default=str(OUT), help="result JSON")
    ap.add_argument("--resume", action="store_true", help="keep the runs of --out; skip labels already there")
    ap.add_argument("--adaptive", action="store_true", help="input-adaptive head budgets (recorded: kept_mean)")
    args = ap.parse_args()
    out_path = Path(args.out)

    import jax

    import polar_jax
    import smollm2_accuracy as acc
    from polar_jax.eval.sparse_ppl import sparse_perplexity
    from polar_jax.routers import load_sparsity
    from smollm2 import smollm2_gguf

    kept = KeptCounter() if args.adaptive else None
    model, tok = polar_jax.load_hf(smollm2_gguf(), dtype="float32")
    ids = np.asarray(tok.encode(acc.WIKITEXT.read_text(encoding="utf-8")), np.int32)
    prev = json.loads(acc.OUT_JSON.read_text())
    get = {(r["mode"], r.get("unit"), r.get("k")): r["ppl"] for r in prev["runs"]}
    out = {"env": {"device": f"{jax.default_backend()} (2 shared cores)", "jax": jax.__version__,
                   "python": platform.python_version(), "date": datetime.date.today().isoformat(),
                   "command": "PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_per_density.py "
                              + " ".join(sys.argv[1:])},
           "eval": {"text": "wikitext-2/test.txt", "first_tokens": acc.MAX_TOKENS, "seq_len": acc.SEQ_LEN},
           "dense": get[("dense", None, None)], "runs": []}
    sources = ([json.loads(out_path.read_text())] if args.resume and out_path.is_file() else []) + [
        json.loads(Path(f).read_text()) for f in args.merge]
    for key in ("device", "jax", "python", "date", "command"):  # every invocation's, in order, "; "-joined
        values = [v for src in sources for v in src["env"][key].split("; ") if v] + [out["env"][key]]
        out["env"][key] = "; ".join(dict.fromkeys(values))
    for src in sources:
        have_runs = {(r["unit"], r["k"], r.get("label")) for r in out["runs"]}
        out["runs"] += [r for r in src["runs"] if (r["unit"], r["k"], r.get("label")) not in have_runs]
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    done = {(r["unit"], r["k"], r.get("label")) for r in out["runs"]}
    for spec in args.point:
        unit, k, units, path, *label = spec.split(":", 4)
        k, units = int(k), int(units)
        label = label[0] if label else Path(path).name
        if (unit, k, label) in done:
            continue
        bundle = load_sparsity(path, model)
        served = bundle.for_density(float(Fraction(k, units)) + 1e-9).config
        t = time.time()
        if kept:
            kept.reset()
        r = sparse_perplexity(model, ids, bundle, "router", float(Fraction(k, units)) + 1e-9, None, unit=unit,
                              seq_len=acc.SEQ_LEN, batch_size=1, max_tokens=acc.MAX_TOKENS, progress=False,
                              adaptive=args.adaptive)
        oracle = get[("oracle", unit, k)]
        train = served.train or {}
        out["runs"].append({"unit": unit, "k": k, "units": units, "bundle": path, "label": label,
                            "attn_hidden": bundle.config.attn_hidden, "train_density": served.attn_train_density,
                            "attn_sets": list(bundle.config.attn_train_densities),
                            "attn_loss": train.get("attn_loss", "bce"), "train_data": train.get("data"),
                            "train_tokens": train.get("tokens"), "epochs": train.get("options", {}).get("epochs"),
                            "lr": train.get("options", {}).get("lr"), "ppl": r.ppl, "tokens": r.tokens,
                            "oracle_ppl": oracle, "committed_router_ppl": get[("router", unit, k)],
                            "router_over_oracle": r.ppl / oracle,
                            **({"adaptive": True, "kept_mean": kept.mean()} if kept else {})})
        extra = f", {kept.mean() * units:.3f} of {units} units kept on average" if kept else ""
        print(f"{unit} {k}/{units} {path}: ppl {r.ppl:.3f}, {r.ppl / oracle:.3f}x the oracle{extra} "
              f"({time.time() - t:.0f}s)", flush=True)
        out_path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
