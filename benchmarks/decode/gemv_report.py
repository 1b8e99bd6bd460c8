"""Tables from the small-batch decode measurements of one GPU session (issue 10 item 4, issue 12):
the GEMV probe, the same-run old/new comparison of the restructured step, and HF transformers next
to our step. Every number is read from the raw files given; nothing is typed in.

    python benchmarks/decode/gemv_report.py --probe R/gemv_probe_call2.json --compare R/call3_compare_versions.jsonl \
        --hf R/call5_hf_llama2-7b.json --ours benchmarks/results/decode_gemv_2026-11-29.json \
        --out benchmarks/results/gemv_probe_2026-11-29.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def probe_lines(probe: dict) -> list[str]:
    out = [f"## Pallas GEMV vs XLA's dot, one projection ({probe['device']}, jax {probe['jax_version']}, "
           f"{probe['date']})", "", f"Command: `{probe['command']}` (CUPTI kernel time per call, weights rotated "
           "past L2; best of the tilings swept at M=1, the best six retried at M=8).", "",
           "| projection | M | XLA us | XLA TB/s | GEMV us | GEMV TB/s | GEMV / XLA speed | tiling (block_n, block_k, split_k, warps, stages) | tilings run |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in probe["gemv"]:
        ok = sorted((c for c in r["configs"] if "us" in c), key=lambda c: c["us"])
        if not ok:
            out.append(f"| {r['shape']} | {r['M']} | {r['xla_us']:.2f} | | no tiling ran | | | | 0 |")
            continue
        b = ok[0]
        tb = lambda us: r["bytes"] / us / 1e6  # noqa: E731
        out.append(f"| {r['shape']} | {r['M']} | {r['xla_us']:.2f} | {tb(r['xla_us']):.2f} | {b['us']:.2f} | "
                   f"{tb(b['us']):.2f} | {r['xla_us'] / b['us']:.2f}x | {b['block_n']}, {b['block_k']}, {b['split_k']}, "
                   f"{b['num_warps']}, {b['num_stages']} | {len(ok)} |")
    att = probe.get("attention_default")
    ok = sorted((c for c in probe.get("attention", []) if "us" in c), key=lambda c: c["us"])
    if att and ok:
        out += ["", f"Flash-decoding at B=1 (32 heads x 128, context 2048): the dispatcher's tiling {att['us']:.2f} us, "
                f"the best of {len(ok)} swept {ok[0]['us']:.2f} us (block_s {ok[0]['block_s']}, min_chunk "
                f"{ok[0]['min_chunk']}, {ok[0]['num_stages']} stages): {att['us'] / ok[0]['us']:.2f}x, not adopted."]
    return out


def compare_lines(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by = {(r["tag"], r["variant"]): r for r in rows}
    r0 = rows[0]
    out = ["", f"## Same-run check of the restructured step (issue 12; {r0['device']}, jax {r0['jax']}, B={r0['batch']}, "
           f"context {r0['context']}, LLaMA-2-7B shape)", "",
           "`benchmarks/decode/compare_versions.py`, run once on commit 54122f1 (before the restructure, `.cmp_old`) and "
           "once on this tree, one after the other in one device call; median of 5 timed loops of 16 steps.", "",
           "| variant | before ms | after ms | after / before speed |", "|---|---|---|---|"]
    for v in ("dense", "heads"):
        b, a = by[("before", v)], by[("after", v)]
        out.append(f"| {v} | {b['step_ms']:.3f} | {a['step_ms']:.3f} | {b['step_ms'] / a['step_ms']:.3f}x |")
    return out


def hf_lines(hf: dict, ours: dict) -> list[str]:
    out = ["", f"## HF transformers next to our step ({hf['device']}, torch {hf['torch']}, transformers "
           f"{hf['transformers']}, {hf['date']})", "", f"HF: `{hf['command']}` (static cache). Ours: "
           "`decode_gemv_2026-11-29.json`, same device call series (random weights of the same shape).", "",
           "| shape | B | context | HF eager ms | HF torch.compile ms | ours dense ms | ours best sparse ms | ours dense vs compile |",
           "|---|---|---|---|---|---|---|---|"]
    for r in hf["rows"]:
        if r["mode"] != "eager":
            continue
        comp = next((x for x in hf["rows"] if x["mode"] == "torch.compile" and x["batch"] == r["batch"]), {})
        mine = [x for x in ours["rows"] if x["shape"] == r["shape"] and x["batch"] == r["batch"]
                and x["context"] == r["context"]]
        dense = next((x["step_s"] for x in mine if x["variant"] == "dense"), None)
        sparse = min((x["step_s"] for x in mine if x["variant"] not in ("dense", "dense-xla")), default=None)
        c = comp.get("step_s")
        fmt = lambda s: f"{1e3 * s:.3f}" if s else "n/a"  # noqa: E731
        ratio = f"{c / dense:.2f}x faster" if (c and dense) else "n/a"
        out.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {fmt(r.get('step_s'))} | {fmt(c)} | {fmt(dense)} | "
                   f"{fmt(sparse)} | {ratio} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", type=Path, required=True)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--hf", type=Path)
    ap.add_argument("--ours", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    lines = ["# Small-batch decode on the H200: the Pallas GEMV, the restructured step, HF transformers", "",
             "Generated by `python benchmarks/decode/gemv_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
             + "`.", ""]
    lines += probe_lines(json.loads(args.probe.read_text()))
    if args.compare:
        lines += compare_lines(args.compare)
    if args.hf and args.ours:
        lines += hf_lines(json.loads(args.hf.read_text()), json.loads(args.ours.read_text()))
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
