"""Accuracy report of the router pipeline on the shared tiny checkpoints (CPU).

Routers are trained and calibrated only on WikiText-2 valid + Tiny Shakespeare (`polar-jax collect`,
`train-routers`, `calibrate`; see README of this folder); everything below is measured on WikiText-2 test.

    python benchmarks/accuracy/run_accuracy.py --model polar-tiny-opt --bundle /tmp/acc/bundle_polar-tiny-opt \
        --data /tmp/acc/data_polar-tiny-opt          # one model -> benchmarks/results/accuracy_<model>.json
    python benchmarks/accuracy/run_accuracy.py --report  # all json -> accuracy_report.md + accuracy_curve.png

Per model: router recall vs oracle on the held-out split of the router data (attention: fraction of the
true top-k units by output norm that the router's top-k finds, per density; MLP: recall of the true union
at the calibrated k), perplexity dense / oracle / router at attention densities {0.75, 0.5, 0.3} and MLP
recall 0.99 at decode batch sizes {1, 8, 32} (non-overlapping 256-token windows), and greedy agreement of
the real sparse decode path with dense over 64 new tokens.
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
DENSITIES = (0.75, 0.5, 0.3)
BATCHES = (1, 8, 32)


def attention_recall(bundle, data, densities) -> dict[str, list[float]]:
    """Per density, per sparse layer: mean fraction of the true top-k units the router's top-k finds."""
    from polar_jax.routers.config import units_kept

    c = bundle.config
    _, val = data.split(float(c.train["val_fraction"]), int(c.train["seed"]))
    out: dict[str, list[float]] = {}
    for rho in densities:
        k = units_kept(rho, c.attn_units)
        rows = []
        for layer in range(1, c.num_layers):
            x = data.field("router_input", layer)[val]
            r_top = np.argsort(-bundle.attn_logits(layer, x), axis=-1)[:, :k]
            o_top = np.argsort(-data.field("unit_norm", layer)[val], axis=-1)[:, :k]
            hit = (r_top[:, :, None] == o_top[:, None, :]).any(-1).sum(-1)
            rows.append(float(np.mean(hit / k)))
        out[str(rho)] = rows
    return out


def mlp_union_recall(bundle, data, recall_target: float, batches, n_batches: int = 64) -> dict[str, list[float]]:
    """Per batch size, per sparse layer: measured mean recall of the true union at the table's k."""
    c = bundle.config
    _, val = data.split(float(c.train["val_fraction"]), int(c.train["seed"]))
    rng = np.random.default_rng(123)
    out: dict[str, list[float]] = {}
    for bsz in batches:
        ks = c.mlp_k(recall_target, bsz)
        row = []
        for layer in range(1, c.num_layers):
            if ks[layer] is None:
                row.append(1.0)  # dense fallback
                continue
            x = data.field("router_input", layer)[val]
            a, b = bundle.mlp(layer)
            lab = data.field("mlp_active", layer)[val]
            recs = []
            for _ in range(n_batches):
                idx = rng.choice(len(x), bsz, replace=False)
                union = lab[idx].any(0)
                top = np.argsort(-np.maximum(x[idx] @ a @ b, 0).sum(0), kind="stable")[: ks[layer]]
                recs.append(union[top].sum() / max(union.sum(), 1))
            row.append(float(np.mean(recs)))
        out[str(bsz)] = row
    return out


def run_model(args) -> dict:
    import jax

    import polar_jax
    from polar_jax.eval.agreement import greedy_agreement
    from polar_jax.eval.sparse_ppl import sparse_perplexity
    from polar_jax.routers import load_sparsity, router_selector
    from polar_jax.routers.collect import CollectedData, read_text_tokens

    model, tok = polar_jax.load_hf(SHARED / "models" / args.model)
    bundle = load_sparsity(args.bundle, model)
    data = CollectedData(args.data)
    c = bundle.config
    ids = read_text_tokens(tok, [SHARED / "data" / "wikitext-2" / "test.txt"])[0]
    kw = dict(seq_len=256, max_tokens=args.max_tokens, progress=False)
    t0 = time.time()
    rows = []

    def ppl(label, mode, rho=None, batch=8, **extra):
        r = sparse_perplexity(model, ids, bundle, mode, rho, 0.99, batch_size=batch, **extra, **kw)
        rows.append({"label": label, "mode": mode, "attn_density": rho, "batch": batch, "ppl": r.ppl,
                     "tokens": r.tokens, **{k: v for k, v in extra.items()}})
        print(f"{args.model} {label} rho={rho} B={batch}: ppl {r.ppl:.3f}  ({time.time() - t0:.0f}s)", flush=True)
        return r.ppl

    dense = ppl("dense", "dense")
    for rho in DENSITIES:
        ppl("oracle heads" + (" + true MLP union" if c.mlp_router else ""), "oracle", rho)
        ppl("oracle heads, per-layer densities", "oracle", rho, per_layer=True)
        ppl("router heads (MLP dense)", "router", rho, mlp=False)
        ppl("router heads, per-layer densities (MLP dense)", "router", rho, mlp=False, per_layer=True)
        if c.mlp_router:
            for b in BATCHES:
                ppl("router heads + router MLP", "router", rho, b)
    if c.mlp_router:
        for b in BATCHES:
            ppl("router MLP only (heads dense)", "router", 1.0, b, attn=False)

    agreement = []
    for rho in DENSITIES:
        sel = router_selector(bundle, rho, 0.99 if c.mlp_router else None)
        a = greedy_agreement(model, ids, sel, n_prompts=8, prompt_len=32, new_tokens=64, seed=0)
        agreement.append({"attn_density": rho, "mlp_recall": 0.99 if c.mlp_router else None, "batch": 8, **a})
        print(f"{args.model} agreement rho={rho}: {a}", flush=True)

    return {
        "model": args.model, "config": {"layers": model.config.num_layers, "units": c.attn_units, "unit": c.unit,
                                        "ffn": c.ffn, "mlp_router": c.mlp_router, "rank": c.mlp_rank},
        "train": {k: c.train[k] for k in ("texts", "tokens", "val_tokens", "options", "mlp_options")},
        "train_best_val_recall": {k: v["best_val_recall"] for k, v in c.train["metrics"].items()},
        "attention_recall_vs_oracle": attention_recall(bundle, data, DENSITIES),
        "mlp_union_recall_at_calibrated_k": mlp_union_recall(bundle, data, 0.99, BATCHES) if c.mlp_router else None,
        "mlp_k_table_0.99": c.mlp_table(0.99).to_dict() if c.mlp_router else None,
        "mlp_k_at_batch": {str(b): list(c.mlp_k(0.99, b)) for b in BATCHES} if c.mlp_router else None,
        "per_layer_units": {str(r): list(c.attn_k(r, per_layer=True)) for r in DENSITIES},
        "dense_ppl": dense, "ppl": rows, "agreement": agreement,
        "eval": {"text": "wikitext-2/test.txt", "max_tokens": args.max_tokens, "seq_len": 256},
        "env": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
                "date": datetime.date.today().isoformat(), "seconds": round(time.time() - t0),
                "command": " ".join(sys.argv)},
    }


def _find(rows, label, rho, batch=None):
    for r in rows:
        if r["label"] == label and r["attn_density"] == rho and (batch is None or r["batch"] == batch):
            return r["ppl"]
    return None


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # accuracy_smollm2.json has its own report (benchmarks/accuracy/smollm2_accuracy.py)
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("accuracy_*.json"))
               if p.name not in ("accuracy_report.json", "accuracy_smollm2.json")]
    lines = ["# Router accuracy on WikiText-2 test (CPU, fp32)", "",
             "Routers trained and calibrated only on WikiText-2 valid + Tiny Shakespeare; evaluated on WikiText-2 "
             "test (non-overlapping 256-token windows, standard perplexity). Masked evaluation with decode "
             "semantics (tested equal to the real sparse decode path). Generated by "
             "`benchmarks/accuracy/run_accuracy.py`.", ""]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        rows, dense, m = r["ppl"], r["dense_ppl"], r["model"]
        mlp = r["config"]["mlp_router"]
        env = r.get("env", {})
        lines += [f"## {m}", "",
                  f"Run on {env.get('backend', '?')} (2 cores), jax {env.get('jax', '?')}, {env.get('date', '?')}, "
                  f"{env.get('seconds', '?')} s; command: `python {env.get('command', '?')}` "
                  "(data and bundle made by the commands in benchmarks/accuracy/README.md).", "",
                  f"{r['config']['layers']} layers, {r['config']['units']} attention {r['config']['unit']}s, "
                  f"ffn {r['config']['ffn']}" + (f", MLP router rank {r['config']['rank']}" if mlp else "")
                  + f"; eval {r['ppl'][0]['tokens']} tokens; dense perplexity **{dense:.2f}**.", "",
                  "Router recall vs oracle (held-out router data; fraction of the true top-k units found):", "",
                  "| density | " + " | ".join(f"layer {i}" for i in range(1, r["config"]["layers"])) + " |",
                  "|---|" + "---|" * (r["config"]["layers"] - 1)]
        for rho, vals in r["attention_recall_vs_oracle"].items():
            lines.append(f"| {rho} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        if mlp:
            lines += ["", "MLP: k per layer at recall 0.99 (None = dense fallback) and measured union recall:", "",
                      "| batch | k per layer | union recall per layer |", "|---|---|---|"]
            for b, ks in r["mlp_k_at_batch"].items():
                rec = r["mlp_union_recall_at_calibrated_k"][b]
                lines.append(f"| {b} | {ks} | " + ", ".join(f"{v:.3f}" for v in rec) + " |")
        lines += ["", "Perplexity (ratio to dense in parentheses):", ""]
        head = ["density", "oracle", "oracle per-layer", "router heads", "router heads per-layer"]
        if mlp:
            head += [f"router heads+MLP B={b}" for b in BATCHES]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        fmt = lambda v: "-" if v is None else f"{v:.2f} ({v / dense:.3f})"  # noqa: E731
        for rho in DENSITIES:
            o = [r for r in rows if r["mode"] == "oracle" and r["attn_density"] == rho]
            cells = [str(rho), fmt(next((x["ppl"] for x in o if not x.get("per_layer")), None)),
                     fmt(next((x["ppl"] for x in o if x.get("per_layer")), None)),
                     fmt(_find(rows, "router heads (MLP dense)", rho)),
                     fmt(_find(rows, "router heads, per-layer densities (MLP dense)", rho))]
            if mlp:
                cells += [fmt(_find(rows, "router heads + router MLP", rho, b)) for b in BATCHES]
            lines.append("| " + " | ".join(cells) + " |")
        if mlp:
            lines += ["", "Router MLP only (all heads): " + ", ".join(
                f"B={b}: {fmt(_find(rows, 'router MLP only (heads dense)', 1.0, b))}" for b in BATCHES)]
        lines += ["", "Greedy agreement with dense (real sparse decode path, 8 prompts of 32 test tokens, 64 new "
                  "tokens, batch 8):", "", "| density | tokens equal | mean identical prefix | full match |", "|---|---|---|---|"]
        for a in r["agreement"]:
            lines.append(f"| {a['attn_density']} | {a['token_agreement']:.3f} | {a['mean_prefix']:.1f} | {a['full_match']:.2f} |")
        lines.append("")
        xs = list(DENSITIES)
        for label, key, style in [("oracle", None, "o-"), ("router heads", "router heads (MLP dense)", "s-"),
                                  ("router heads per-layer", "router heads, per-layer densities (MLP dense)", "^-")]:
            if key is None:
                ys = [next(x["ppl"] for x in rows if x["mode"] == "oracle" and x["attn_density"] == rho and not x.get("per_layer")) for rho in xs]
            else:
                ys = [_find(rows, key, rho) for rho in xs]
            ax.plot(xs, [y / dense for y in ys], style, label=label)
        if mlp:
            ax.plot(xs, [_find(rows, "router heads + router MLP", rho, 1) / dense for rho in xs], "d--", label="router heads+MLP B=1")
        ax.axhline(1.05, color="gray", ls=":", label="dense +5%")
        ax.set_title(f"{m} (dense ppl {dense:.1f})")
        ax.set_xlabel("attention density (fraction of units kept)")
        ax.set_ylabel("perplexity / dense")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_curve.png", dpi=110)
    findings = Path(__file__).with_name("findings.md")  # hand-written reading of the numbers, kept on regeneration
    if findings.is_file():
        lines += ["", findings.read_text().rstrip()]
    (RESULTS / "accuracy_report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="shared model folder name")
    p.add_argument("--bundle", help="calibrated sparsity bundle for the model")
    p.add_argument("--data", help="the collected router data the bundle was trained on (held-out split used)")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--report", action="store_true", help="aggregate the per-model json files")
    args = p.parse_args()
    if args.report:
        report()
        return
    res = run_model(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"accuracy_{args.model}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
