"""MLP-router quality vs router rank r on the shared tiny checkpoints (issue 10: lower the router rank "where
recall allows"), and what each rank would cost on OPT-6.7B in bytes read per decode step (CPU, fp32).

The MLP router is the low-rank classifier d -> r -> ffn (PAPER.md). For each bundle (one per rank, all
trained on the same collected data with the same options) this script measures, on data the routers never
trained on:

- the union density the calibrated top-k table gives (k / ffn, mean over the sparse layers 1..L-1) at decode
  batch sizes 1, 8, 32 for recall target 0.99 (and 0.95 where calibrated), the table as calibrated, *without*
  the dense fallback (the fallback density is reported beside it), and the true union's density (the
  oracle's, independent of the router);
- the achieved recall of the true union at the table's k on the held-out split of the router data
  (`run_accuracy.mlp_union_recall`, the same function as the accuracy report);
- perplexity on WikiText-2 test with dense attention and the MLP router at B = 1, 8, 32 against dense
  (`polar_jax.eval.sparse_ppl.sparse_perplexity`, the evaluation run_accuracy.py uses): the top-k rule at
  the table's k (what the densities above describe), and the threshold rule (the bundle's default rule,
  which run_accuracy.py reports);

then projects the densities to OPT-6.7B (d 4096, ffn 16384, 32 layers, vocab 50272, bf16):

    router bytes / layer      = r6 * (d + ffn) * 2,      r6 = (r / d_tiny) * 4096
    MLP bytes read / layer    = density * 2 * d * ffn * 2
    dense step bytes (B = 1)  = 32 * (4 d^2 + 2 d ffn) * 2 + 50272 * d * 2   (~13.3 GB: weights only,
                                 no KV cache, biases or norms)
    router share of the step  = 31 * router bytes / dense step bytes  (layer 0 is dense: no router)

Exact commands of the committed result (data + bundles in /tmp/rank_study; see also the README here):

    polar-jax collect --model /work/shared/models/tiny-opt --out /tmp/rank_study/data_tiny-opt \\
        --max-tokens 160000 --overwrite \\
        --text /work/shared/data/wikitext-2/valid.txt /work/shared/data/tinyshakespeare/input.txt
    for r in 128 64 32 16 256; do
      polar-jax train-routers --data /tmp/rank_study/data_tiny-opt --out /tmp/rank_study/bundle_tiny-opt_r$r \\
          --rank $r --epochs 1 --mlp-epochs 8 --mlp-lr 3e-3 --overwrite
      polar-jax calibrate --bundle /tmp/rank_study/bundle_tiny-opt_r$r --data /tmp/rank_study/data_tiny-opt \\
          --recall 0.95 0.99 --dense-threshold 1.0
    done
    python benchmarks/accuracy/router_rank.py --model tiny-opt --data /tmp/rank_study/data_tiny-opt \\
        --bundle 256=/tmp/rank_study/bundle_tiny-opt_r256 --bundle 128=/tmp/rank_study/bundle_tiny-opt_r128 \\
        --bundle 64=/tmp/rank_study/bundle_tiny-opt_r64 --bundle 32=/tmp/rank_study/bundle_tiny-opt_r32 \\
        --bundle 16=/tmp/rank_study/bundle_tiny-opt_r16 --max-tokens 16384 --rules topk \
        --commands /tmp/rank_study/commands_tiny-opt.txt   # the three commands above, stored in the json
        # -> benchmarks/results/router_rank_tiny-opt.{json,md,png} (26 min on the 2-core CPU)
    python benchmarks/accuracy/router_rank.py --rewrite benchmarks/results/router_rank_tiny-opt.json
        # re-renders the .md/.png from the json (nothing measured again)

polar-tiny-opt (d 256) the same way at r in {128, 64, 32, 16}, with the README's polar-tiny-opt option
`--mlp-epochs 12` (-> router_rank_polar-tiny-opt.*). `--rules topk`: the threshold rule's perplexity (the
default `--rules topk threshold`) was left out of the committed runs for time (B=1 evaluations took 2.5-5
min each on the shared 2-core machine); its calibrated kept fraction is reported from the table.

`--epochs 1` trains the attention routers for one epoch only: they are unused here (attention stays dense).
`--dense-threshold 1.0` keeps the calibrated k even where it is above 75 % of the neurons, so that the
measured recall and perplexity are those of the router at its k; the density served with the default 0.75
fallback is reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path("/work/shared") if Path("/work/shared").exists() else REPO.parent / "shared"
BATCHES = (1, 8, 32)
RECALL = 0.99
FALLBACK = 0.75  # `polar-jax calibrate`'s default --dense-threshold (k / N above it runs the MLP dense)

# OPT-6.7B, the model of the GPU measurements in issue 10 (bf16 weights: 2 bytes each)
OPT67B = {"d": 4096, "ffn": 16384, "layers": 32, "vocab": 50272, "bytes": 2}


# ---- the bytes model ------------------------------------------------------------------------------------
def router_bytes(rank: float, d: int = OPT67B["d"], ffn: int = OPT67B["ffn"], width: int = OPT67B["bytes"]) -> float:
    """Bytes of one layer's MLP router (a [d, r] and an [r, ffn] matrix)."""
    return rank * (d + ffn) * width


def mlp_bytes(density: float, d: int = OPT67B["d"], ffn: int = OPT67B["ffn"], width: int = OPT67B["bytes"]) -> float:
    """Bytes of one layer's MLP weights read when a fraction `density` of its neurons is kept (fc1 rows and
    fc2 columns of the kept neurons: 2 * d per neuron)."""
    return density * 2 * d * ffn * width


def dense_step_bytes(d: int = OPT67B["d"], ffn: int = OPT67B["ffn"], layers: int = OPT67B["layers"],
                     vocab: int = OPT67B["vocab"], width: int = OPT67B["bytes"]) -> int:
    """Weight bytes one dense decode step reads at B = 1: per layer q, k, v, o (4 d^2) and the MLP
    (2 d ffn), plus the LM head (vocab x d). KV cache, biases and norms are left out (small at B = 1)."""
    return layers * (4 * d * d + 2 * d * ffn) * width + vocab * d * width


def opt_projection(rank_ratio: float, density: dict[str, float]) -> dict[str, Any]:
    """OPT-6.7B bytes per layer for a router of rank ratio r/d and the MLP densities per batch size."""
    d, ffn, layers = OPT67B["d"], OPT67B["ffn"], OPT67B["layers"]
    r6 = rank_ratio * d
    rb = router_bytes(r6)
    step = dense_step_bytes()
    return {
        "rank": r6, "router_bytes_per_layer": rb,
        "dense_mlp_bytes_per_layer": mlp_bytes(1.0),
        "mlp_bytes_per_layer": {b: mlp_bytes(v) for b, v in density.items()},
        "router_plus_mlp_bytes_per_layer": {b: rb + mlp_bytes(v) for b, v in density.items()},
        "router_plus_mlp_vs_dense_mlp": {b: (rb + mlp_bytes(v)) / mlp_bytes(1.0) for b, v in density.items()},
        # the routers of every sparse layer (layer 0 runs dense, without a router) against the dense step
        "router_share_of_dense_step_b1": (layers - 1) * rb / step,
    }


# ---- measurements ---------------------------------------------------------------------------------------
def raw_table_bundle(bundle):
    """The bundle with the dense fallback off (threshold 1.0), so `mlp_k` returns the calibrated k wherever
    it is below N: recall and perplexity are then those of the router at its own k."""
    from polar_jax.routers.bundle import SparsityBundle

    return SparsityBundle(dataclasses.replace(bundle.config, mlp_dense_threshold=1.0), bundle.params,
                          bundle.signature)


def table_densities(config, recall: float, batches: Sequence[int]) -> dict[str, Any]:
    """Per batch size: k / N per sparse layer from the top-k table (interpolated as the runtime does), its
    mean, the mean with the 0.75 dense fallback, and the threshold rule's calibrated kept fraction and
    capacity (only at calibrated batch sizes, as stored)."""
    table = config.mlp_table(recall)
    sparse = [i for i in range(config.num_layers) if i not in config.dense_layers]
    out: dict[str, Any] = {"k": {}, "density": {}, "density_mean": {}, "density_mean_with_fallback": {},
                           "threshold_rule_kept_mean": {}, "threshold_rule_capacity": {}}
    for b in batches:
        ks = [table.k_for(i, b, config.mlp_tile, config.ffn) for i in sparse]
        dens = [k / config.ffn for k in ks]
        out["k"][str(b)] = ks
        out["density"][str(b)] = dens
        out["density_mean"][str(b)] = float(np.mean(dens))
        out["density_mean_with_fallback"][str(b)] = float(np.mean([1.0 if v > FALLBACK else v for v in dens]))
        if table.union is not None and b in table.batch_sizes:
            j = table.batch_sizes.index(b)
            out["threshold_rule_kept_mean"][str(b)] = float(np.mean([table.union[i][j] for i in sparse]))
            out["threshold_rule_capacity"][str(b)] = [int(table.capacity[i][j]) for i in sparse]
    return out


def true_union_density(data, config, batches: Sequence[int], n_batches: int = 64, seed: int = 7) -> dict[str, float]:
    """Mean fraction of the ffn neurons active in at least one token of a random held-out batch (the oracle's
    density; a floor for any router), mean over the sparse layers."""
    train = config.train or {}
    _, val = data.split(float(train.get("val_fraction", 0.1)), int(train.get("seed", 0)))
    rng = np.random.default_rng(seed)
    out = {}
    for b in batches:
        vals = []
        for layer in range(config.num_layers):
            if layer in config.dense_layers:
                continue
            lab = data.field("mlp_active", layer)[val]
            vals += [lab[rng.choice(len(lab), b, replace=False)].any(0).mean() for _ in range(n_batches)]
        out[str(b)] = float(np.mean(vals))
    return out


def study_bundle(bundle, data, batches: Sequence[int] = BATCHES, recall: float = RECALL, model=None,
                 ids: np.ndarray | None = None, max_tokens: int | None = 16384, seq_len: int = 256,
                 rules: Sequence[str] = ("topk", "threshold"), n_batches: int = 64,
                 log=print) -> dict[str, Any]:
    """Everything measured for one bundle: densities from the table(s), achieved union recall at the table's
    k, and (with `model` and `ids`) perplexity with the MLP router only, per rule and batch size."""
    sys.path.insert(0, str(HERE))
    from run_accuracy import mlp_union_recall  # the accuracy report's own measurement

    from polar_jax.eval.sparse_ppl import sparse_perplexity

    c = bundle.config
    raw = raw_table_bundle(bundle)
    d = int(bundle.signature.get("arch", {}).get("hidden_size", 0)) or int(bundle.params["mlp.1.a"].shape[0])
    out: dict[str, Any] = {"rank": c.mlp_rank, "d": d, "ffn": c.ffn, "rank_ratio": c.mlp_rank / d,
                           "train_best_val_recall": {k: v["best_val_recall"] for k, v in
                                                     (c.train or {}).get("metrics", {}).items() if k.startswith("mlp")},
                           "tables": {}}
    for t in c.mlp_tables:
        out["tables"][str(t.recall)] = table_densities(c, t.recall, batches)
    rec = mlp_union_recall(raw, data, recall, batches, n_batches)
    out["union_recall"] = rec
    out["union_recall_mean"] = {b: float(np.mean(v)) for b, v in rec.items()}
    if model is not None and ids is not None:
        ppl = {}
        for rule in rules:
            for b in batches:
                t0 = time.time()
                r = sparse_perplexity(model, ids, raw, "router", 1.0, recall, batch_size=b, attn=False,
                                      mlp_rule=rule, seq_len=seq_len, max_tokens=max_tokens, progress=False)
                ppl[f"{rule}/{b}"] = {"rule": rule, "batch": b, "ppl": r.ppl, "tokens": r.tokens}
                log(f"rank {c.mlp_rank} {rule} B={b}: ppl {r.ppl:.3f} ({time.time() - t0:.0f} s)")
        out["ppl"] = ppl
    return out


def dense_ppl(model, ids: np.ndarray, max_tokens: int | None, seq_len: int = 256) -> tuple[float, int]:
    from polar_jax.eval.sparse_ppl import sparse_perplexity

    r = sparse_perplexity(model, ids, None, "dense", seq_len=seq_len, max_tokens=max_tokens, progress=False)
    return r.ppl, r.tokens


# ---- report ---------------------------------------------------------------------------------------------
def add_projection(res: dict[str, Any]) -> None:
    """OPT-6.7B bytes for every rank, from the top-k table's densities at recall 0.99 (no fallback)."""
    for row in res["ranks"]:
        t = row["tables"][str(RECALL)]
        row["opt67b"] = opt_projection(row["rank_ratio"], t["density_mean"])
        # the threshold rule (the bundle's default rule) keeps another fraction for the same recall target:
        # its calibrated mean kept fraction, projected the same way (its recall is not measured here)
        if t["threshold_rule_kept_mean"]:
            row["opt67b_threshold_rule"] = opt_projection(row["rank_ratio"], t["threshold_rule_kept_mean"])
    res["opt67b_model"] = {
        **OPT67B, "dense_step_bytes_b1": dense_step_bytes(),
        "formulas": {"router_bytes_per_layer": "r6 * (d + ffn) * 2, r6 = (r / d_tiny) * 4096",
                     "mlp_bytes_per_layer": "density * 2 * d * ffn * 2",
                     "dense_step_bytes_b1": "32 * (4*d*d + 2*d*ffn) * 2 + 50272 * d * 2",
                     "router_share_of_dense_step_b1": "31 * router_bytes_per_layer / dense_step_bytes_b1 "
                                                      "(layer 0 dense, no router)"}}


def write_markdown(res: dict[str, Any], path: Path) -> None:
    m, dense = res["model"], res.get("dense_ppl")
    bs = [str(b) for b in res["batches"]]
    rows = sorted(res["ranks"], key=lambda r: -r["rank"])
    f3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# MLP router rank vs router quality: {m} (CPU, fp32)", "",
             f"Generated by `benchmarks/accuracy/router_rank.py` on {res['date']} (machine: {res['device']}, jax "
             f"{res['jax']}, {res['seconds']} s). Routers trained and calibrated on WikiText-2 valid + Tiny "
             "Shakespeare; densities and recall on the held-out split of that router data; perplexity on "
             + (f"WikiText-2 test ({res.get('ppl_tokens')} tokens, 256-token windows; attention dense, MLP router "
                "only). " if res.get("dense_ppl") else "(not measured: --no-ppl). ") +
             f"{res['layers']} layers (layer 0 dense), d = {res['d']}, ffn = {res['ffn']}. "
             f"Dense perplexity **{f3(dense)}**.", "",
             "Commands:", "", "```", *res["commands"], "```", "",
             f"## Recall target {RECALL}: top-k table density, true union, achieved recall, perplexity", "",
             "Density = k / ffn from the calibrated top-k table, mean over layers 1..L-1, without the dense "
             "fallback (in brackets: with the default 0.75 fallback). True union = the oracle's density "
             "(router-independent). Recall = mean true-union recall at the table's k. ppl ratio = "
             "perplexity / dense with the top-k rule at the table's k"
             + (" (threshold rule in brackets)." if any(k.startswith("threshold/") for r in rows
                                                       for k in r.get("ppl", {})) else
                "; the threshold rule's perplexity was not measured in this run.") + "", "",
             "| r | r/d | " + " | ".join(f"density B={b}" for b in bs) + " | "
             + " | ".join(f"recall B={b}" for b in bs) + " | " + " | ".join(f"ppl ratio B={b}" for b in bs) + " |",
             "|---|---|" + "---|" * (3 * len(bs))]
    for r in rows:
        t = r["tables"][str(RECALL)]
        cells = [str(r["rank"]), f"1/{round(1 / r['rank_ratio'])}"]
        cells += [f"{t['density_mean'][b]:.3f} ({t['density_mean_with_fallback'][b]:.3f})" for b in bs]
        cells += [f"{r['union_recall_mean'][b]:.4f}" for b in bs]
        for b in bs:
            p = r.get("ppl", {})
            tk, th = p.get(f"topk/{b}"), p.get(f"threshold/{b}")
            cells.append((f3(tk["ppl"] / dense) if tk else "-") + (f" ({th['ppl'] / dense:.3f})" if th else ""))
        lines.append("| " + " | ".join(cells) + " |")
    tu = res["true_union_density"]
    lines += ["| true union (oracle) | - | " + " | ".join(f"{tu[b]:.3f}" for b in bs) + " | "
              + " | ".join("1" for _ in bs) + " | " + " | ".join("-" for _ in bs) + " |", ""]
    other = [str(t) for t in sorted({float(k) for r in rows for k in r["tables"]}) if t != RECALL]
    for rt in other:
        lines += [f"Top-k table density at recall {rt} (mean over layers 1..L-1, no fallback): " + "; ".join(
            f"r={r['rank']}: " + ", ".join(f"B={b} {r['tables'][rt]['density_mean'][b]:.3f}" for b in bs)
            for r in rows if rt in r["tables"]), ""]
    lines += ["Per-layer k at recall 0.99 (layers 1..L-1): " + "; ".join(
        f"r={r['rank']}: " + ", ".join(f"B={b} {r['tables'][str(RECALL)]['k'][b]}" for b in bs) for r in rows), ""]
    lines += ["Threshold rule (the bundle's default rule) at recall 0.99, calibrated mean kept fraction: " + "; ".join(
        f"r={r['rank']}: " + ", ".join(f"B={b} {r['tables'][str(RECALL)]['threshold_rule_kept_mean'].get(b, float('nan')):.3f}"
                                       for b in bs) for r in rows), ""]
    o = res["opt67b_model"]
    lines += ["## Projected to OPT-6.7B (bf16), bytes per layer", "",
              f"d = {o['d']}, ffn = {o['ffn']}; router bytes = {o['formulas']['router_bytes_per_layer']}; MLP bytes "
              f"= {o['formulas']['mlp_bytes_per_layer']} with the tiny model's top-k density at recall 0.99 "
              f"(no fallback); dense MLP = {mlp_bytes(1.0) / 1e6:.1f} MB per layer. Dense step at B=1 = "
              f"`{o['formulas']['dense_step_bytes_b1']}` = {o['dense_step_bytes_b1'] / 1e9:.2f} GB; router share = "
              f"`{o['formulas']['router_share_of_dense_step_b1']}`.", "",
              "| r/d | OPT rank | router MB | " + " | ".join(f"router+MLP MB B={b}" for b in bs)
              + " | " + " | ".join(f"(router+MLP)/dense MLP B={b}" for b in bs) + " | router share of dense step B=1 |",
              "|---|---|---|" + "---|" * (2 * len(bs)) + "---|"]
    for r in rows:
        p = r["opt67b"]
        lines.append(f"| 1/{round(1 / r['rank_ratio'])} | {p['rank']:.0f} | {p['router_bytes_per_layer'] / 1e6:.1f} | "
                     + " | ".join(f"{p['router_plus_mlp_bytes_per_layer'][b] / 1e6:.1f}" for b in bs) + " | "
                     + " | ".join(f"{p['router_plus_mlp_vs_dense_mlp'][b]:.3f}" for b in bs)
                     + f" | {100 * p['router_share_of_dense_step_b1']:.2f} % |")
    if all("opt67b_threshold_rule" in r for r in rows):
        lines += ["", "Same projection with the threshold rule's calibrated mean kept fraction at recall 0.99 (the "
                  "bundle's default rule; a static capacity above it is compiled in, see the json):", "",
                  "| r/d | " + " | ".join(f"router+MLP MB B={b}" for b in bs) + " |", "|---|" + "---|" * len(bs)]
        for r in rows:
            p = r["opt67b_threshold_rule"]
            lines.append(f"| 1/{round(1 / r['rank_ratio'])} | "
                         + " | ".join(f"{p['router_plus_mlp_bytes_per_layer'][b] / 1e6:.1f}" for b in bs) + " |")
    lines += ["", "## What the numbers say", ""] + res.get("reading", []) + [
        "", f"Caveat: {res['layers']}-layer tiny models (d = {res['d']}) trained on ~160k tokens; the projection "
        "assumes OPT-6.7B's union density at a given r/d equals the tiny model's, which is not measured here. "
        "The bytes model counts weights only."]
    path.write_text("\n".join(lines) + "\n")


def reading(res: dict[str, Any]) -> list[str]:
    """Plain statements generated from the numbers (no judgement beyond them)."""
    rows = sorted(res["ranks"], key=lambda r: -r["rank"])
    dense = res.get("dense_ppl")
    out = []
    ref = next((r for r in rows if abs(r["rank_ratio"] - 0.25) < 1e-9), rows[0])
    for r in rows:
        if r is ref:
            continue
        t, t0 = r["tables"][str(RECALL)]["density_mean"], ref["tables"][str(RECALL)]["density_mean"]
        s = (f"- r = d/{round(1 / r['rank_ratio'])} (r = {r['rank']}) vs r = d/{round(1 / ref['rank_ratio'])} "
             f"(r = {ref['rank']}): union density at recall 0.99 " + ", ".join(
                 f"B={b} {t0[b]:.3f} -> {t[b]:.3f}" for b in t))
        if dense and "ppl" in r and "ppl" in ref:
            s += "; top-k perplexity ratio " + ", ".join(
                f"B={b} {ref['ppl'][f'topk/{b}']['ppl'] / dense:.3f} -> {r['ppl'][f'topk/{b}']['ppl'] / dense:.3f}"
                for b in t if f"topk/{b}" in r["ppl"])
        p, p0 = r["opt67b"], ref["opt67b"]
        s += ("; OPT-6.7B router+MLP bytes per layer " + ", ".join(
            f"B={b} {p0['router_plus_mlp_bytes_per_layer'][b] / 1e6:.1f} -> {p['router_plus_mlp_bytes_per_layer'][b] / 1e6:.1f} MB"
            for b in t) + ".")
        out.append(s)
    if dense and all("ppl" in r for r in rows):
        ratios = [v["ppl"] / dense for r in rows for k, v in r["ppl"].items() if k.startswith("topk/")]
        out.append(f"- Perplexity with the top-k rule at the recall-0.99 table's k: ratio to dense between "
                   f"{min(ratios):.4f} and {max(ratios):.4f} over every rank and batch size measured.")
    over = [f"r = {r['rank']} B={b}" for r in rows for b, v in r["tables"][str(RECALL)]["density_mean_with_fallback"].items()
            if v > r["tables"][str(RECALL)]["density_mean"][b] + 1e-12]
    if over:
        out.append(f"- Where some layer's k is above {FALLBACK} of the neurons, the default dense fallback would run that "
                   "layer's MLP dense (density in brackets in the first table): " + ", ".join(over) + ".")
    best = {b: min(rows, key=lambda r: r["opt67b"]["router_plus_mlp_bytes_per_layer"][b]) for b in
            (str(x) for x in res["batches"])}
    out.append("- Fewest projected OPT-6.7B router+MLP bytes per layer among the ranks measured: " + ", ".join(
        f"B={b} r/d = 1/{round(1 / r['rank_ratio'])}" for b, r in best.items()) + ".")
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(res["ranks"], key=lambda r: r["rank_ratio"])
    xs = [r["rank_ratio"] for r in rows]
    fig, (a, b2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, bsz in enumerate(str(x) for x in res["batches"]):
        color = f"C{i}"
        a.plot(xs, [r["tables"][str(RECALL)]["density_mean"][bsz] for r in rows], "o-", color=color,
               label=f"router top-k, B={bsz}")
        a.axhline(res["true_union_density"][bsz], color=color, ls=":", lw=1, label=f"true union, B={bsz}")
        if res.get("dense_ppl") and "ppl" in rows[0]:
            b2.plot(xs, [r["ppl"][f"topk/{bsz}"]["ppl"] / res["dense_ppl"] for r in rows], "o-", color=color,
                    label=f"top-k rule, B={bsz}")
            if "threshold/" + bsz in rows[0]["ppl"]:
                b2.plot(xs, [r["ppl"][f"threshold/{bsz}"]["ppl"] / res["dense_ppl"] for r in rows], "s--",
                        color=color, alpha=0.6, label=f"threshold rule, B={bsz}")
    for ax in (a, b2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"1/{round(1 / x)}" for x in xs])
        ax.set_xlabel(f"router rank ratio r/d (d = {res['d']})")
        ax.grid(alpha=0.3)
    a.set_ylabel(f"union density k/ffn at recall {RECALL} (layers 1..{res['layers'] - 1})")
    a.set_title(f"{res['model']}: MLP union density vs router rank")
    a.legend(fontsize=7)
    b2.set_ylabel("perplexity / dense (WikiText-2 test)")
    b2.set_title("MLP router only (attention dense)")
    b2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="shared model folder name (e.g. tiny-opt)")
    p.add_argument("--data", help="the collected router data every bundle was trained on")
    p.add_argument("--bundle", action="append", metavar="RANK=PATH",
                   help="a calibrated bundle of that MLP router rank (repeat per rank)")
    p.add_argument("--max-tokens", type=int, default=16384, help="WikiText-2 test tokens for perplexity")
    p.add_argument("--rules", nargs="+", default=["topk", "threshold"], choices=["topk", "threshold"])
    p.add_argument("--no-ppl", action="store_true", help="densities and recall only")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--commands", help="text file with the collect/train/calibrate commands (stored verbatim)")
    p.add_argument("--rewrite", metavar="JSON", help="only rewrite the .md/.png (and the derived fields of the json) "
                   "from an earlier result json; nothing is measured again")
    args = p.parse_args(argv)
    if args.rewrite:
        res = json.loads(Path(args.rewrite).read_text())
        print(write_results(res, Path(args.out_dir)).with_suffix(".md").read_text())
        return
    if not (args.model and args.data and args.bundle):
        p.error("--model, --data and --bundle are required (unless --rewrite)")

    import jax

    import polar_jax
    from polar_jax.routers import load_sparsity
    from polar_jax.routers.collect import CollectedData, read_text_tokens

    t0 = time.time()
    model, tok = polar_jax.load_hf(SHARED / "models" / args.model)
    data = CollectedData(args.data)
    ids = None if args.no_ppl else read_text_tokens(tok, [SHARED / "data" / "wikitext-2" / "test.txt"])[0]
    command = "python benchmarks/accuracy/router_rank.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res: dict[str, Any] = {"model": args.model, "device": f"CPU ({platform.machine()}, 2 cores), fp32",
                           "jax": jax.__version__, "date": datetime.date.today().isoformat(),
                           "python": platform.python_version(), "command": command,
                           "commands": (Path(args.commands).read_text().strip().splitlines() if args.commands
                                        else []) + [command],
                           "batches": list(BATCHES), "recall": RECALL, "layers": model.config.num_layers,
                           "data": args.data, "ranks": []}
    if ids is not None:
        res["dense_ppl"], res["ppl_tokens"] = dense_ppl(model, ids, args.max_tokens)
        print(f"dense ppl {res['dense_ppl']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    for spec in args.bundle:
        rank, path = spec.split("=", 1)
        bundle = load_sparsity(path, model)
        if bundle.config.mlp_rank != int(rank):
            raise SystemExit(f"{path} has MLP rank {bundle.config.mlp_rank}, not {rank}")
        row = study_bundle(bundle, data, model=None if ids is None else model, ids=ids,
                           max_tokens=args.max_tokens, rules=args.rules,
                           log=lambda s: print(f"{s} [{time.time() - t0:.0f} s]", flush=True))
        row["bundle"] = path
        res["ranks"].append(row)
        res["d"], res["ffn"] = row["d"], row["ffn"]
        print(f"rank {rank}: density {row['tables'][str(RECALL)]['density_mean']} recall "
              f"{row['union_recall_mean']} [{time.time() - t0:.0f} s]", flush=True)
    res["true_union_density"] = true_union_density(data, bundle.config, res["batches"])
    res["seconds"] = round(time.time() - t0)
    stem = write_results(res, Path(args.out_dir))
    print(stem.with_suffix(".md").read_text())


def write_results(res: dict[str, Any], out_dir: Path) -> Path:
    """Adds the OPT-6.7B projection and the generated reading, writes router_rank_<model>.{json,md,png}."""
    add_projection(res)
    res["reading"] = reading(res)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"router_rank_{res['model']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write_markdown(res, stem.with_suffix(".md"))
    plot(res, stem.with_suffix(".png"))
    return stem


if __name__ == "__main__":
    main()
