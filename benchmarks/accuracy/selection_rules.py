"""Accuracy of the selection rules the decode step uses (CPU, fp32, masked evaluation with decode semantics).

- MLP: the paper's top-k rule (k from the calibrated table) against the threshold rule (a neuron is kept
  when some row's router logit passes the calibrated threshold), both calibrated for the same recall of
  the true union, at decode batch sizes 1 / 8 / 32: perplexity and the fraction of neurons kept.
- Heads: fixed per-sequence budgets (top-k) against input-adaptive budgets (a calibrated logit threshold,
  clipped to [k/2, 2k], with the same mean) at several densities.

    python benchmarks/accuracy/selection_rules.py --model polar-tiny-opt --bundle default --max-tokens 16384
Writes benchmarks/results/selection_rules_<model>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import jax
import numpy as np

import polar_jax
from polar_jax.eval.perplexity import perplexity
from polar_jax.eval.sparse_ppl import sparse_perplexity

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path("/work/shared") if Path("/work/shared").exists() else REPO.parent / "shared"


def kept_fraction(bundle, rule: str, batch: int, recall: float) -> float:
    """Mean fraction of N kept over the sparse layers, from the calibration (threshold rule) or the table (top-k)."""
    c = bundle.config
    t = c.mlp_table(recall)
    sparse = [i for i in range(c.num_layers) if i not in c.dense_layers]
    if rule == "topk":
        return float(np.mean([t.k_for(i, batch, c.mlp_tile, c.ffn) for i in sparse]) / c.ffn)
    j = t.batch_sizes.index(batch)
    return float(np.mean([t.union[i][j] for i in sparse]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="polar-tiny-opt", help="a shared model name, or a checkpoint / HF / .gguf path")
    ap.add_argument("--name", default=None, help="name of the results files (default: the model's)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--head-batch", type=int, default=8, help="windows per evaluation batch for the head runs")
    ap.add_argument("--bundle", default="default")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--recall", type=float, default=0.99)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    path = SHARED / "models" / args.model if (SHARED / "models" / args.model).is_dir() else Path(args.model)
    model, tok = polar_jax.load_hf(path, "float32")
    name = args.name or path.stem
    bundle = polar_jax.load_sparsity(args.bundle, model)
    ids = np.asarray(tok.encode((SHARED / "data" / "wikitext-2" / "test.txt").read_text()))
    kw = dict(seq_len=args.seq_len, max_tokens=args.max_tokens, progress=False)
    dense = perplexity(model, ids, batch_size=args.head_batch, **kw).ppl
    rows = []
    if bundle.config.mlp_router:
        for batch in (1, 8, 32):
            for rule in ("topk", "threshold"):
                ppl = sparse_perplexity(model, ids, bundle, "router", attn=False, mlp_recall=args.recall,
                                        batch_size=batch, mlp_rule=rule, **kw).ppl
                rows.append({"part": "mlp", "rule": rule, "batch": batch, "ppl": ppl, "ratio": ppl / dense,
                             "kept": kept_fraction(bundle, rule, batch, args.recall)})
                print(rows[-1], flush=True)
    for rho in args.densities:
        for adaptive in (False, True):
            ppl = sparse_perplexity(model, ids, bundle, "router", attn_density=rho, mlp=False, batch_size=args.head_batch,
                                    adaptive=adaptive, **kw).ppl
            rows.append({"part": "heads", "rule": "adaptive" if adaptive else "fixed", "density": rho, "ppl": ppl,
                         "ratio": ppl / dense})
            print(rows[-1], flush=True)
    res = {"model": name, "bundle": args.bundle, "dense_ppl": dense, "tokens": args.max_tokens,
           "recall": args.recall, "rows": rows, "device": jax.devices()[0].device_kind, "host": platform.node(),
           "jax_version": jax.__version__, "date": datetime.date.today().isoformat(),
           "command": "python benchmarks/accuracy/selection_rules.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"selection_rules_{name}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = [f"# Selection rules: accuracy on {name} ({res['device']}, fp32)", "",
             f"jax {res['jax_version']}, {res['date']}. WikiText-2 test, first {args.max_tokens} tokens, {args.seq_len}-token "
             f"windows, masked evaluation with decode semantics; dense perplexity {dense:.2f}. Bundle `{args.bundle}` "
             f"(MLP tables at recall {args.recall}).", "", f"Command: `{res['command']}`", "",
             "| part | rule | batch / density | kept | perplexity | ratio to dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        where = f"B={r['batch']}" if r["part"] == "mlp" else f"density {r['density']}"
        kept = f"{100 * r['kept']:.0f} % of N" if "kept" in r else f"{r['density']:.2f} mean"
        lines.append(f"| {r['part']} | {r['rule']} | {where} | {kept} | {r['ppl']:.2f} | {r['ratio']:.3f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for rule, m in (("topk", "o-"), ("threshold", "s-")):
        pts = [r for r in rows if r["part"] == "mlp" and r["rule"] == rule]
        if pts:
            axes[0].plot([100 * r["kept"] for r in pts], [r["ratio"] for r in pts], m, label=rule)
            for r in pts:
                axes[0].annotate(f"B={r['batch']}", (100 * r["kept"], r["ratio"]), fontsize=7)
    axes[0].set_xlabel("% of MLP neurons kept (mean over sparse layers)")
    axes[0].set_ylabel("perplexity / dense")
    axes[0].set_title("MLP union: top-k vs threshold rule")
    axes[0].legend()
    for rule, m in (("fixed", "o-"), ("adaptive", "s-")):
        pts = [r for r in rows if r["part"] == "heads" and r["rule"] == rule]
        axes[1].plot([r["density"] for r in pts], [r["ratio"] for r in pts], m, label=rule)
    axes[1].set_xlabel("mean fraction of heads kept")
    axes[1].set_ylabel("perplexity / dense")
    axes[1].set_title("Head budgets: fixed vs input-adaptive")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
