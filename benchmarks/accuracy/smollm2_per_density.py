"""Router perplexity on SmolLM2 with routers trained for the density they serve (labels = the top-k units at
that k), against the committed results of the same text, windows and tokens (`accuracy_smollm2.json`: its
routers are trained at one density per unit kind and used at all of them).

    PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_per_density.py \
        --point group:1:3:/tmp/acc4/g1_h64 --point group:1:3:/tmp/acc4/g1_lin \
        --point head:6:9:/tmp/acc4/h6_h64 --point head:4:9:/tmp/acc4/h4_h64

The bundles come from `polar-jax train-routers ... --attn-train-density` (benchmarks/accuracy/smollm2.md).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", action="append", required=True, help="unit:k:units:bundle folder")
    args = ap.parse_args()

    import jax

    import polar_jax
    import smollm2_accuracy as acc
    from polar_jax.eval.sparse_ppl import sparse_perplexity
    from polar_jax.routers import load_sparsity
    from smollm2 import smollm2_gguf

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
    for spec in args.point:
        unit, k, units, path = spec.split(":", 3)
        k, units = int(k), int(units)
        bundle = load_sparsity(path, model)
        t = time.time()
        r = sparse_perplexity(model, ids, bundle, "router", float(Fraction(k, units)) + 1e-9, None, unit=unit,
                              seq_len=acc.SEQ_LEN, batch_size=1, max_tokens=acc.MAX_TOKENS, progress=False)
        oracle = get[("oracle", unit, k)]
        out["runs"].append({"unit": unit, "k": k, "units": units, "bundle": path, "attn_hidden": bundle.config.attn_hidden,
                            "train_density": bundle.config.attn_train_density, "ppl": r.ppl, "tokens": r.tokens,
                            "oracle_ppl": oracle, "committed_router_ppl": get[("router", unit, k)],
                            "router_over_oracle": r.ppl / oracle})
        print(f"{unit} {k}/{units} {path}: ppl {r.ppl:.3f}, {r.ppl / oracle:.3f}x the oracle ({time.time() - t:.0f}s)",
              flush=True)
        OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
