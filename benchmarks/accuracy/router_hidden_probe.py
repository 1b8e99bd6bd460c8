"""Held-out recall of linear vs hidden-layer attention routers on collected router data (issue 14).

For every sparse layer, trains one router per configuration with the product trainer
(`polar_jax.routers.train.train_attention_router`, the labels and validation split `train-routers`
uses) and measures recall@k on the whole held-out split for every k = 1..U-1: the fraction of the true
top-k units (by output norm) the router's top-k finds. Results go to a JSON (one entry per data set,
configuration and layer) written after every layer, so an interrupted run resumes where it stopped.

    PYTHONPATH=. python benchmarks/accuracy/router_hidden_probe.py run --data /tmp/acc3/smollm2_heads \
        --name heads --train-density 0.6 --config linear:0:3e-3 --config h64:64:3e-3 --out OUT.json
    PYTHONPATH=. python benchmarks/accuracy/router_hidden_probe.py bundle --data /tmp/acc3/smollm2_heads \
        --name heads --bundle BUNDLE --label LABEL --out OUT.json
    PYTHONPATH=. python benchmarks/accuracy/router_hidden_probe.py table OUT.json

A configuration is NAME:HIDDEN:LR[:LOSS] (HIDDEN 0 = the linear router; LOSS one of
`train.ATTN_LOSSES`, default bce: the BCE on top-k labels of `train-routers`; pair / pair_k: the
mass-weighted pairwise ranking loss on the norms). Epochs 40, patience 5, batch 1024, seed 0 unless given
(the settings of benchmarks/accuracy/smollm2.md). Besides recall@k, each layer records `mass`: the share of
the attention-output mass (squared unit norms) the router's top-k keeps, over the oracle top-k's share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np


def recall_per_k(logits: np.ndarray, norms: np.ndarray) -> list[float]:
    """Mean recall@k for k = 1..U-1 (ties in the router's order broken by the stable sort, as in
    run_accuracy.attention_recall)."""
    units = norms.shape[-1]
    r_order = np.argsort(-logits, axis=-1, kind="stable")
    o_order = np.argsort(-norms, axis=-1, kind="stable")
    out = []
    for k in range(1, units):
        hit = (r_order[:, :k, None] == o_order[:, None, :k]).any(-1).sum(-1)
        out.append(float(np.mean(hit / k)))
    return out


def _note_env(env: dict) -> None:
    """Device, jax, date and the command of this invocation, added to those of earlier ones ("; ")."""
    import jax

    def add(key, value):
        have = [v for v in env.get(key, "").split("; ") if v]
        env[key] = "; ".join(have + ([value] if value not in have else []))

    add("device", f"{jax.default_backend()} (2 shared cores)")
    add("jax", jax.__version__)
    add("date", datetime.date.today().isoformat())
    add("command", "PYTHONPATH=. python benchmarks/accuracy/router_hidden_probe.py " + " ".join(sys.argv[1:]))


def mass_ratio_per_k(logits: np.ndarray, norms: np.ndarray) -> list[float]:
    """For k = 1..U-1: the attention-output mass the router's top-k keeps over the mass the oracle's keeps."""
    from polar_jax.routers.calibrate import importance_curve

    router, oracle = importance_curve(logits, norms), importance_curve(norms, norms)
    return [float(router[k] / oracle[k]) for k in range(1, norms.shape[-1])]


def _parse_config(text: str) -> tuple[str, int, float, str]:
    name, hidden, lr, *loss = text.split(":")
    return name, int(hidden), float(lr), (loss[0] if loss else "bce")


def run(args: argparse.Namespace) -> None:
    from polar_jax.routers.collect import CollectedData
    from polar_jax.routers.config import units_kept
    from polar_jax.routers.train import TrainOptions, train_attention_router

    data = CollectedData(args.data)
    units, layers = int(data.meta["units"]), int(data.meta["num_layers"])
    k = units_kept(args.train_density, units)
    tr, val = data.split(args.val_fraction, args.seed)
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {"env": {}, "sets": {}}
    _note_env(res["env"])
    entry = res["sets"].setdefault(args.name, {"data": str(data.path), "units": units, "train_k": k,
                                       "train_tokens": int(len(tr)), "val_tokens": int(len(val)),
                                       "epochs": args.epochs, "patience": args.patience, "configs": {}})
    configs = [_parse_config(c) for c in args.config]
    wanted = [int(v) for v in args.layers.split(",")] if args.layers else list(range(1, layers))
    for layer in wanted:
        todo = [c for c in configs if str(layer) not in entry["configs"].get(c[0], {}).get("layers", {})]
        if not todo:
            continue
        x = data.field("router_input", layer)
        norms = data.field("unit_norm", layer)
        for name, hidden, lr, loss in todo:
            opts = TrainOptions(epochs=args.epochs, lr=lr, patience=args.patience, seed=args.seed)
            t0 = time.time()
            router, info = train_attention_router(x[tr], norms[tr], x[val], norms[val], k, opts,
                                                  f"{args.name} {name} layer {layer}", log=lambda s: None,
                                                  progress=False, hidden=hidden, loss=loss)
            logits = np.asarray(router(x[val]))
            cfg = entry["configs"].setdefault(name, {"hidden": hidden, "lr": lr, "layers": {}})
            if loss != "bce":
                cfg["loss"] = loss
            cfg["layers"][str(layer)] = {"recall": recall_per_k(logits, norms[val]),
                                         "mass": mass_ratio_per_k(logits, norms[val]),
                                         "epochs_run": info["epochs_run"], "seconds": round(time.time() - t0, 1)}
            out.write_text(json.dumps(res, indent=1) + "\n")
            print(f"{args.name} {name} layer {layer}: recall@{k} "
                  f"{cfg['layers'][str(layer)]['recall'][k - 1]:.4f}, mass@{k} "
                  f"{cfg['layers'][str(layer)]['mass'][k - 1]:.4f} ({info['epochs_run']} epochs, "
                  f"{time.time() - t0:.0f}s)", flush=True)


def from_bundle(args: argparse.Namespace) -> None:
    """Adds a trained bundle's routers as configuration `--label`: the same recall measurement on the same
    held-out split (the bundle's own val_fraction and seed), no training here."""
    from polar_jax.routers import load_bundle
    from polar_jax.routers.collect import CollectedData
    from polar_jax.routers.config import units_kept

    data, bundle = CollectedData(args.data), load_bundle(args.bundle).attention_set(args.set)
    c = bundle.config
    _, val = data.split(float(c.train["val_fraction"]), int(c.train["seed"]))
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {"env": {}, "sets": {}}
    _note_env(res["env"])
    entry = res["sets"].setdefault(args.name, {"data": str(data.path), "units": c.attn_units,
                                               "train_k": units_kept(c.attn_train_density, c.attn_units),
                                               "train_tokens": int(c.train["tokens"]), "val_tokens": int(len(val)),
                                               "epochs": c.train["options"]["epochs"],
                                               "patience": c.train["options"]["patience"], "configs": {}})
    cfg = entry["configs"][args.label] = {"hidden": c.attn_hidden, "lr": c.train["options"]["lr"],
                                          "bundle": str(args.bundle), "layers": {}}
    for layer in range(1, c.num_layers):
        if layer in c.dense_layers:
            continue
        x = data.field("router_input", layer)[val]
        logits, norms = bundle.attn_logits(layer, x), data.field("unit_norm", layer)[val]
        cfg["layers"][str(layer)] = {"recall": recall_per_k(logits, norms), "mass": mass_ratio_per_k(logits, norms),
                                     "epochs_run": _epochs_run(c.train["metrics"], layer, args.set)}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{args.name} {args.label}: {len(cfg['layers'])} layers from {args.bundle}")


def labels(args: argparse.Namespace) -> None:
    """Label analysis on the held-out split: per k, the share of the attention-output mass (squared norms) the
    oracle's top-k keeps, and the share of tokens whose k-th and (k+1)-th largest norms are within 10 % of
    each other (where top-k labels are nearly arbitrary); means over the sparse layers."""
    from polar_jax.routers.calibrate import importance_curve
    from polar_jax.routers.collect import CollectedData

    data = CollectedData(args.data)
    _, val = data.split(args.val_fraction, args.seed)
    curves, close = [], []
    for layer in range(1, int(data.meta["num_layers"])):
        n = data.field("unit_norm", layer)[val].astype(np.float64)
        curves.append(importance_curve(n, n)[1:-1])
        s = -np.sort(-n, axis=-1)
        close.append([float(np.mean((s[:, k - 1] - s[:, k]) / np.maximum(s[:, k - 1], 1e-30) < 0.1))
                      for k in range(1, n.shape[-1])])
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {"env": {}, "sets": {}}
    _note_env(res["env"])
    res.setdefault("labels", {})[args.name] = {
        "data": str(data.path), "val_tokens": int(len(val)),
        "oracle_mass_kept": [float(v) for v in np.mean(curves, 0)],
        "boundary_within_10pct": [float(v) for v in np.mean(close, 0)]}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["labels"][args.name]))


def _epochs_run(metrics: dict, layer: int, index: int) -> int:
    key = f"attn.{layer}" if f"attn.{layer}" in metrics else f"attn_set{index}.{layer}"
    return metrics[key]["epochs_run"]


def table(path: Path, baseline: str = "linear") -> str:
    """Markdown per data set: mean (min) recall@k over layers for every configuration, each over the layers
    it was run on, and its mean gain over `baseline` on those same layers (paired)."""
    res = json.loads(Path(path).read_text())
    lines = []
    for name, entry in res["sets"].items():
        units, cfgs = entry["units"], entry["configs"]
        base_name = baseline if baseline in cfgs else next(iter(cfgs))  # e.g. only a committed bundle measured
        base = cfgs[base_name]
        lines += [f"{name} ({units} units, trained at top-{entry['train_k']}, {entry['train_tokens']} training and "
                  f"{entry['val_tokens']} held-out tokens): mean recall@k over layers (lowest layer); gain = mean over "
                  f"the same layers of (config - {base_name})", "",
                  "| config | hidden | lr | layers | " + " | ".join(f"k={k}" for k in range(1, units)) + " | "
                  + " | ".join(f"gain k={k}" for k in range(1, units)) + " |",
                  "|---|---|---|---|" + "---|" * (2 * (units - 1))]
        for cname, c in cfgs.items():
            layers = sorted(c["layers"], key=int)
            rec = np.array([c["layers"][layer]["recall"] for layer in layers])
            paired = [layer for layer in layers if layer in base["layers"]]
            gain = (np.array([c["layers"][la]["recall"] for la in paired])
                    - np.array([base["layers"][la]["recall"] for la in paired])).mean(0)
            cells = " | ".join(f"{m:.3f} ({n:.3f})" for m, n in zip(rec.mean(0), rec.min(0)))
            gains = " | ".join(f"{g:+.3f}" for g in gain)
            lines.append(f"| {cname} | {c['hidden']} | {c['lr']:g} | {len(layers)} | {cells} | {gains} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--name", required=True, help="entry name in the JSON (e.g. heads, groups)")
    r.add_argument("--train-density", type=float, required=True, help="top-k label density (as train-routers)")
    r.add_argument("--config", action="append", required=True, help="NAME:HIDDEN:LR (repeatable)")
    r.add_argument("--layers", default=None, help="comma-separated layers (default: every sparse layer)")
    r.add_argument("--epochs", type=int, default=40)
    r.add_argument("--patience", type=int, default=5)
    r.add_argument("--val-fraction", type=float, default=0.1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True)
    b = sub.add_parser("bundle", help="measure a trained bundle's routers (no training)")
    b.add_argument("--data", required=True)
    b.add_argument("--name", required=True)
    b.add_argument("--bundle", required=True)
    b.add_argument("--label", required=True, help="configuration name in the JSON")
    b.add_argument("--set", type=int, default=0, help="attention-router set of a multi-density bundle")
    b.add_argument("--out", required=True)
    lab = sub.add_parser("labels", help="label analysis of the held-out split (no router)")
    lab.add_argument("--data", required=True)
    lab.add_argument("--name", required=True)
    lab.add_argument("--val-fraction", type=float, default=0.1)
    lab.add_argument("--seed", type=int, default=0)
    lab.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("json")
    t.add_argument("--md", default=None, help="also write the tables to this markdown file")
    args = p.parse_args()
    if args.cmd == "run":
        run(args)
    elif args.cmd == "bundle":
        from_bundle(args)
    elif args.cmd == "labels":
        labels(args)
    else:
        text = table(Path(args.json))
        print(text)
        if args.md:
            res = json.loads(Path(args.json).read_text())
            env = res["env"]
            head = (f"# Linear vs hidden-layer attention routers on SmolLM2-135M router data (held-out recall)\n\n"
                    f"Generated from `{Path(args.json).name}` by `router_hidden_probe.py table`; run on {env['device']}, "
                    f"jax {env['jax']}, {env['date']}; commands: `{env['command']}`.\n\n{res.get('about', '')}\n\n")
            Path(args.md).write_text(head + text)


if __name__ == "__main__":
    main()
