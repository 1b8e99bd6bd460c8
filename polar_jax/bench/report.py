"""Decode benchmark results: the table printed at the end of a run, and JSON + markdown + PNG files."""

from __future__ import annotations

import json
from pathlib import Path

PART_LABELS = {"attn_proj": "attention projections", "attention": "attention (KV)", "mlp": "MLP",
               "router": "router + selection", "other": "other"}


def _fmt_ms(s: float) -> str:
    return f"{1e3 * s:.3f}"


def rows_sorted(merged: dict) -> list[dict]:
    order = {"dense": 0, "heads": 1, "mlp": 2, "both": 3, "auto": 4}
    return sorted(merged["rows"], key=lambda r: (r["shape"], r["context"], r["batch"], order.get(r["variant"], 9)))


def table_lines(merged: dict) -> list[str]:
    lines = ["| shape | B | context | variant (runs) | step ms: median (min–max over processes) | processes | "
             "tokens/s | % roofline | speedup vs dense | Amdahl bound | % of bound | heads kept | MLP kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_sorted(merged):
        lo, hi = r["spread"]
        sp = r.get("speedup")
        ratios = ["", "", ""] if sp is None else [f"{sp:.2f}x", f"{r['amdahl_bound']:.2f}x",
                                                  f"{100 * r['bound_fraction']:.0f} %"]
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['context']} | {r['variant']} ({r['runs']}) | "
            f"{_fmt_ms(r['step_s'])} ({_fmt_ms(lo)}–{_fmt_ms(hi)}) | {r.get('processes', 1)} | {r['tokens_per_s']:.0f} | "
            f"{100 * r['roofline_fraction']:.0f} % | " + " | ".join(ratios) + f" | {r['attn_fraction']:.2f} | "
            f"{r['mlp_fraction']:.3f} |")
    return lines


def breakdown_lines(merged: dict) -> list[str]:
    rows = [r for r in rows_sorted(merged) if r.get("breakdown_ms")]
    if not rows:
        return []
    parts = list(PART_LABELS)
    lines = ["| shape | B | context | variant | " + " | ".join(PART_LABELS[p] for p in parts) +
             " | kernel total | kernels/step |", "|---|---|---|---|" + "---|" * (len(parts) + 2)]
    for r in rows:
        b = r["breakdown_ms"]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['variant']} | "
                     + " | ".join(f"{b[p]:.3f}" for p in parts) + f" | {b['total']:.3f} | {b['kernels']:.0f} |")
    return lines


# Issue 10's GPU goals: (shape, batch, context, variant) -> the speedup over dense it asks for.
SPEEDUP_GOALS = {("opt-6.7b", 32, 2048, "both"): 2.2, ("llama2-7b", 16, 4096, "heads"): 1.45,
                 ("opt-6.7b", 1, 2048, "both"): 1.6}


def goal_lines(merged: dict) -> list[str]:
    """Each goal with the measured number and met / missed, computed from the rows (nothing typed)."""
    rows = {(r["shape"], r["batch"], r["context"], r["variant"]): r for r in merged["rows"]}
    out = []
    for key, want in SPEEDUP_GOALS.items():
        r = rows.get(key)
        got = "not measured" if r is None or "speedup" not in r else (
            f"{r['speedup']:.2f}x ({100 * r['bound_fraction']:.0f} % of its {r['amdahl_bound']:.2f}x bound): "
            + ("met" if r["speedup"] >= want else "missed"))
        out.append(f"- {key[0]}, B={key[1]}, context {key[2]}, {key[3]}: >= {want}x wanted; {got}")
    sparse = [r for r in merged["rows"] if r["variant"] in ("heads", "mlp", "both") and r["batch"] >= 16
              and "bound_fraction" in r]
    met = [r for r in sparse if r["bound_fraction"] >= 0.9]
    worst = min(sparse, key=lambda r: r["bound_fraction"]) if sparse else None
    out.append(f"- sparse points at B >= 16 within 90 % of their Amdahl bound: {len(met)} of {len(sparse)}"
               + (f" (lowest: {worst['shape']} B={worst['batch']} {worst['variant']} at "
                  f"{100 * worst['bound_fraction']:.0f} %)" if worst else ""))
    auto = [r for r in merged["rows"] if r["variant"] == "auto" and "speedup" in r]
    ok = [r for r in auto if r["speedup"] >= 0.98]
    out.append(f"- `auto` at >= 0.98x dense: {len(ok)} of {len(auto)} points"
               + (f" (lowest {min(r['speedup'] for r in auto):.2f}x)" if auto else ""))
    for r in merged["rows"]:
        if r["variant"] == "dense" and r["batch"] == 1:
            out.append(f"- dense step at B=1 >= 75 % of the memory roofline: {r['shape']} "
                       f"{100 * r['roofline_fraction']:.0f} %: " + ("met" if r["roofline_fraction"] >= 0.75 else "missed"))
    return out


def _mesh_words(merged: dict) -> str:
    """", tensor-parallel mesh data=D x tensor=T" for a run on a mesh (roofline = the devices' bandwidth)."""
    mesh = merged.get("mesh")
    return "" if not mesh else f", mesh data={mesh['data']} x tensor={mesh['tensor']}"


def print_table(merged: dict) -> None:
    print(f"\n{merged['device']}{_mesh_words(merged)}, jax {merged['jax_version']}, up to {merged['processes']} "
          f"process(es), bandwidth {merged['bandwidth_Bps'] / 1e12:.2f} TB/s per device")
    for line in table_lines(merged) + [""] + breakdown_lines(merged) + [""] + goal_lines(merged):
        print(line)


def write_report(merged: dict, out: Path, stem: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"decode_sparse_{merged['date']}"
    (out / f"{stem}.json").write_text(json.dumps(merged, indent=1))
    lines = [f"# End-to-end decode step: sparse vs our dense ({merged['device']}{_mesh_words(merged)})", "",
             f"jax {merged['jax_version']}, {merged['date']}, fresh processes per point as listed "
             f"(median; spread = min–max of the per-process medians). Measured bandwidth "
             f"{merged['bandwidth_Bps'] / 1e12:.2f} TB/s (the higher of copy and read; roofline = bytes / it).",
             "Amdahl bound = dense bytes / the sparse variant's bytes without its routers (what sparsity could "
             "save); % of bound = speedup / bound.", ""]
    for cmd in merged.get("commands", [merged["command"]]):
        lines.append(f"Command: `{cmd}`")
    if "commands" in merged:
        lines.append(f"Merged by: `{merged['command']}`")
    lines.append("")
    lines += ["## Goals", ""] + goal_lines(merged) + ["", "## All points", ""]
    lines += table_lines(merged)
    bl = breakdown_lines(merged)
    if bl:
        lines += ["", "## Where the time goes (CUPTI, ms per step, first process)", ""] + bl
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _plots(merged, out / f"{stem}.png")
    return out / f"{stem}.md"


def _plots(merged: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["shape"], r["context"]) for r in merged["rows"]})
    fig, axes = plt.subplots(2, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 8), squeeze=False)
    for j, (shape, ctx) in enumerate(groups):
        ax = axes[0][j]
        rows = [r for r in merged["rows"] if r["shape"] == shape and r["context"] == ctx and "speedup" in r]
        for v in ("heads", "mlp", "both", "auto"):
            pts = sorted((r["batch"], r["speedup"]) for r in rows if r["variant"] == v)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=v)
        ax.axhline(1.0, color="gray", ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape}, context {ctx}: speedup over dense")
        ax.set_xlabel("batch size")
        ax.legend()
        ax = axes[1][j]
        br = sorted((r["batch"], r["variant"], r["breakdown_ms"]) for r in rows if r.get("breakdown_ms")
                    and r["variant"] in ("dense", "both", "heads"))
        if br:
            labels = [f"B={b}\n{v}" for b, v, _ in br]
            bottom = [0.0] * len(br)
            for part, label in PART_LABELS.items():
                vals = [x[2][part] for x in br]
                ax.bar(range(len(br)), vals, bottom=bottom, label=label)
                bottom = [a + b for a, b in zip(bottom, vals)]
            ax.set_xticks(range(len(br)), labels, fontsize=7)
            ax.set_ylabel("ms per step (CUPTI)")
            ax.legend(fontsize=7)
        else:  # say so rather than leave empty axes
            ax.text(0.5, 0.5, "not profiled in this run\n(bench decode --breakdown)", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(f"{shape}: where the step's time goes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START, README_END = "<!-- decode-sparse:start -->", "<!-- decode-sparse:end -->"
_README_POINTS = [("opt-6.7b", 1, 2048), ("opt-6.7b", 8, 2048), ("opt-6.7b", 32, 2048), ("opt-6.7b", 64, 2048),
                  ("llama2-7b", 16, 4096), ("llama3.1-8b", 16, 4096), ("llama3.1-8b", 64, 4096)]


def readme_block(merged: dict, source: str) -> str:
    """The README's end-to-end summary, generated from a merged report (a test keeps the two in sync)."""
    rows = {(r["shape"], r["batch"], r["context"], r["variant"]): r for r in merged["rows"]}
    lines = [README_START, f"Source: `{source}` ({merged['device']}, jax {merged['jax_version']}, {merged['date']}).", "",
             "| shape | B | context | dense step | heads | MLP | heads + MLP | auto (its choice) | best vs its Amdahl bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape, b, c in _README_POINTS:
        dense = rows.get((shape, b, c, "dense"))
        if dense is None:
            continue
        cells = []
        for v in ("heads", "mlp", "both"):
            r = rows.get((shape, b, c, v))
            cells.append("–" if r is None else f"{r['speedup']:.2f}x")
        auto = rows.get((shape, b, c, "auto"))
        cells.append("–" if auto is None else f"{auto['speedup']:.2f}x ({auto['runs']})")
        sparse = [rows[(shape, b, c, v)] for v in ("heads", "mlp", "both") if (shape, b, c, v) in rows]
        best = max(sparse, key=lambda r: r["speedup"]) if sparse else None
        cells.append("–" if best is None else f"{best['variant']}: {100 * best['bound_fraction']:.0f} % of "
                     f"{best['amdahl_bound']:.2f}x")
        lines.append(f"| {shape} | {b} | {c} | {1e3 * dense['step_s']:.2f} ms | " + " | ".join(cells) + " |")
    lines += ["", "Goals (issue 10):", ""] + goal_lines(merged) + [README_END]
    return "\n".join(lines)
