"""Markdown tables and a plot from probe_mlp.py JSON files.

    python benchmarks/kernels/probe_report.py RAW_DIR/probe_*.json --name mlp_probe_2026-11-21 \\
        --notes benchmarks/kernels/probe_findings.md

Writes benchmarks/results/<name>.md and <name>.png: per-kernel times of every variant at each
probed shape, and the bandwidth of the shipped MLP next to XLA copy / column-sum kernels that
move the same number of bytes in the same run.
"""
from __future__ import annotations

import argparse
import json
import os

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
COPY_TBPS = 2.93  # measured copy bandwidth of the day's sweep (kernels_2026-11-21_third.md)


def cfg_text(op: str, c: dict) -> str:
    if op == "up":
        text = (f"{c['block_m']}x{c['block_a']}x{c['block_k']} split {c['split_k']}, "
                f"{c['num_warps']}w {c['num_stages']}s")
        extra = ["indices before n" if c.get("early_rows") else ""]
    else:
        text = (f"{c['block_m']}x{c['block_j']}x{c['block_d']} split {c['split_j']}, "
                f"{c['num_warps']}w {c['num_stages']}s")
        extra = ["last-arriver sum" if c.get("last_arriver") else ""]
    return text + "".join(f", {e}" for e in extra if e)


def kernels_text(per: dict | None) -> str:
    if not per:
        return "–"
    return " + ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))


def shape_tables(runs: list[tuple[str, dict]]) -> list[str]:
    lines = []
    for label, rep in runs:
        for row in rep["shapes"]:
            head = (f"#### {row['model']} M={row['M']} density {row['density']} "
                    f"({row['active_bytes'] / 1e6:.1f} MB active) — {label}")
            lines += [head, "", "| op | tiling | µs per call (kernels) | rel. err vs XLA |",
                      "|---|---|---|---|"]
            for op in ("up", "down"):
                for i, rec in enumerate(row[op]):
                    mark = " (shipped)" if i == 0 else ""
                    us = rec.get("us", float("nan"))
                    err = rec.get("rel_err")
                    lines.append(f"| {op}{mark} | {cfg_text(op, rec['cfg'])} | **{us:.1f}** = "
                                 f"{kernels_text(rec.get('us_per_kernel'))} | "
                                 f"{'–' if err is None else f'{err:.1e}'} |")
            if "cupti_shipped_us" in row:
                bw = row["active_bytes"] / row["cupti_shipped_us"] / 1e6
                lines += ["", f"Shipped MLP (up + down in one jit): {row['cupti_shipped_us']:.1f} µs "
                          f"of kernels = {bw:.2f} TB/s on active weights "
                          f"({100 * bw / COPY_TBPS:.0f}% of {COPY_TBPS} TB/s)."]
            lines.append("")
    return lines


def size_table(runs: list[tuple[str, dict]]) -> list[str]:
    lines = ["| run | MB | XLA column sum µs (reads MB) | TB/s | XLA copy µs (reads MB and writes MB) | TB/s read + write |",
             "|---|---|---|---|---|---|"]
    for label, rep in runs:
        for r in rep.get("sizes", []):
            lines.append(f"| {label} | {r['MB']:.1f} | {r['read_sum_us']:.1f} | "
                         f"{r['read_sum_TBps']:.2f} | {r['copy_us']:.1f} | {r['copy_TBps']:.2f} |")
    return lines


def plot(runs: list[tuple[str, dict]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    label, rep = runs[0]
    sizes = rep.get("sizes", [])
    ax.plot([2 * r["MB"] for r in sizes], [r["copy_TBps"] for r in sizes], "o-",
            label="XLA copy (one kernel, bytes read + written)")
    ax.plot([r["MB"] for r in sizes], [r["read_sum_TBps"] for r in sizes], "s--",
            label="XLA column sum (one kernel, bytes read)")
    seen = set()
    markers = {1: ("^", "black"), 16: ("s", "tab:green"), 64: ("v", "tab:red")}
    for _, rep in runs:
        for row in rep["shapes"]:
            key = (row["model"], row["M"], row["density"])
            if key in seen or "cupti_shipped_us" not in row:
                continue
            seen.add(key)
            mb = row["active_bytes"] / 1e6
            marker, color = markers.get(row["M"], ("o", "gray"))
            ax.plot([mb], [mb / row["cupti_shipped_us"]], marker, color=color, ls="")
    for M, (marker, color) in markers.items():
        ax.plot([], [], marker, color=color, ls="",
                label=f"selective MLP M={M}, shipped (gather_up + gather_down)")
    ax.axhline(0.75 * COPY_TBPS, color="r", lw=0.8, ls=":", label="goal: 75% of copy bandwidth")
    ax.set_xscale("log")
    ticks = [16, 32, 64, 128, 256, 512]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("bytes moved per call (MB)")
    ax.set_ylabel("TB/s")
    ax.set_ylim(0, 3.2)
    ax.set_title(f"Bandwidth at small sizes, {rep['device']} (jax {rep['jax']})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--name", required=True)
    ap.add_argument("--notes", default="", help="hand-written findings placed before the tables")
    args = ap.parse_args()
    runs = []
    for i, path in enumerate(args.files, 1):
        with open(path) as fh:
            runs.append((f"run {i}", json.load(fh)))
    first = runs[0][1]
    lines = [f"# Selective-MLP probe on {first['device']} ({first['date'][:10]})", "",
             f"jax {first['jax']}; per-kernel CUPTI times (median, input sets rotated past the "
             "50 MB L2), every variant checked against the XLA reference on the GPU first.", "",
             "Commands:"]
    lines += [f"- run {i}: `{rep['command']}`" for i, (_, rep) in enumerate(runs, 1)]
    lines.append("")
    if args.notes:
        with open(args.notes) as fh:
            lines += [fh.read().rstrip(), ""]
    lines += ["## Plain XLA kernels at the same byte counts", ""] + size_table(runs) + [""]
    png = f"{args.name}.png"
    lines += [f"![{png}]({png})", "", "## Variants at the probed shapes", ""]
    lines += shape_tables(runs)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot(runs, os.path.join(RESULTS, png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
