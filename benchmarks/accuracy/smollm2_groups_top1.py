"""Router perplexity at 1 of 3 KV groups on SmolLM2 with group routers trained on top-1 labels (the density
they are used at), hidden 64 and linear, against the committed results (same text, windows, tokens).

    PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_groups_top1.py   # bundles: benchmarks/accuracy/smollm2.md
"""
import datetime
import json
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path
import numpy as np
sys.path.insert(0, "benchmarks/accuracy")
import jax
import polar_jax
import smollm2_accuracy as acc
from polar_jax.eval.sparse_ppl import sparse_perplexity
from polar_jax.routers import load_sparsity
from smollm2 import smollm2_gguf

model, tok = polar_jax.load_hf(smollm2_gguf(), dtype="float32")
ids = np.asarray(tok.encode(acc.WIKITEXT.read_text(encoding="utf-8")), np.int32)
prev = json.loads(Path("benchmarks/results/accuracy_smollm2.json").read_text())
get = {(r["mode"], r.get("unit"), r.get("k")): r["ppl"] for r in prev["runs"]}
out = {"env": {"device": f"{jax.default_backend()} (2 shared cores)", "jax": jax.__version__,
               "python": platform.python_version(), "date": datetime.date.today().isoformat(),
               "command": ("polar-jax train-routers --data /tmp/acc3/smollm2_groups --out /tmp/acc4/g1_h64 --attn-hidden 64 "
                           "--attn-train-density 0.34 --epochs 40 --lr 3e-3 --patience 5; the same without --attn-hidden "
                           "(--out /tmp/acc4/g1_lin); PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_groups_top1.py (sparse_perplexity, router, 1 of 3 "
                           "KV groups, the first 16384 WikiText-2 test tokens, windows of 2048)")},
       "dense": get[("dense", None, None)], "oracle_1of3": get[("oracle", "group", 1)],
       "committed_router_1of3": get[("router", "group", 1)], "runs": []}
rho = float(Fraction(1, 3)) + 1e-9
for name in ("g1_h64", "g1_lin"):
    b = load_sparsity(f"/tmp/acc4/{name}", model)
    t = time.time()
    r = sparse_perplexity(model, ids, b, "router", rho, None, unit="group", seq_len=acc.SEQ_LEN, batch_size=1,
                          max_tokens=acc.MAX_TOKENS, progress=False)
    out["runs"].append({"bundle": name, "attn_hidden": b.config.attn_hidden, "train_density": b.config.attn_density,
                        "ppl": r.ppl, "tokens": r.tokens, "router_over_oracle": r.ppl / out["oracle_1of3"],
                        "best_val_recall_mean": float(np.mean([m["best_val_recall"] for m in b.config.train["metrics"].values()]))})
    print(name, r.ppl, r.ppl / out["oracle_1of3"], f"{time.time() - t:.0f}s", flush=True)
Path("benchmarks/results/accuracy_smollm2_groups_top1.json").write_text(json.dumps(out, indent=1))
