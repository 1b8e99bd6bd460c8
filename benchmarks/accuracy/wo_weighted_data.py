"""Router data whose labels weight each query head's output norm by the gain of its output projection
(issue 14, SmolLM2 per-density routers).

The oracle ranks heads by the norm of their attention output before `o_proj`, ||h_j||; what a head adds to
the residual stream is W_o,j h_j (W_o,j: the head's rows of the output projection). With
c_j = ||W_o,j||_F / sqrt(head_dim) (the RMS gain of W_o,j for an isotropic h_j), c_j ||h_j|| estimates
||W_o,j h_j||. On SmolLM2-135M c_j varies from 0.46 to 1.27 times its layer's mean, so the two rankings
differ. This writes a copy of a per-head collection (`polar-jax collect --unit head`) whose `unit_norm` is
c_j ||h_j|| (per layer), optionally summed per KV group (as `group_data_from_heads.py` does for the plain
norms); the other files are linked. Routers trained on it are evaluated against the unchanged oracle.

    PYTHONPATH=.:tests python benchmarks/accuracy/wo_weighted_data.py HEAD_DATA OUT [--groups 3]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def head_gains(model) -> np.ndarray:
    """[L, H]: c_j = ||W_o,j||_F / sqrt(head_dim) of every layer's query heads."""
    cfg = model.config
    hd = cfg.head_dim
    out = []
    for layer in model.layers:
        o = np.asarray(layer.attn.o[...], np.float64).reshape(cfg.num_heads, hd, -1)
        out.append(np.sqrt(np.square(o).sum(axis=(1, 2)) / hd))
    return np.asarray(out, np.float32)


def derive(src: Path, dst: Path, gains: np.ndarray, groups: int | None) -> None:
    from polar_jax.models.collect import group_norms
    from polar_jax.routers.collect import META_FILE, CollectedData

    data = CollectedData(src)
    if data.meta["unit"] != "head":
        raise SystemExit(f"{src} is not a per-head collection (unit={data.meta['unit']!r})")
    dst.mkdir(parents=True, exist_ok=False)
    for f in sorted(src.iterdir()):
        if f.name == META_FILE:
            continue
        if f.name.endswith(".unit_norm.npy"):
            heads = np.load(f, allow_pickle=False) * gains[:, None, :]  # [L, n, H]
            if groups:
                heads = np.asarray(group_norms(heads, groups))
            np.save(dst / f.name, np.asarray(heads, np.float32), allow_pickle=False)
        else:
            os.link(f, dst / f.name)
    meta = dict(data.meta, derived_from=str(src), label_weight="o_proj gain per head (wo_weighted_data.py)")
    if groups:
        meta.update(unit="group", units=groups)
    (dst / META_FILE).write_text(json.dumps(meta, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--groups", type=int, default=None, help="sum per KV group (number of KV heads)")
    args = ap.parse_args()

    import polar_jax
    from smollm2 import smollm2_gguf

    model, _ = polar_jax.load_hf(smollm2_gguf(), dtype="float32")
    derive(Path(args.src), Path(args.dst), head_gains(model), args.groups)


if __name__ == "__main__":
    main()
