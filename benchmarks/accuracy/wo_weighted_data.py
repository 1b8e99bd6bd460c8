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
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # group_data_from_heads beside it


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
    from group_data_from_heads import relabel
    from polar_jax.models.collect import group_norms

    def weigh(heads: np.ndarray) -> np.ndarray:
        weighted = heads * gains[:, None, :]  # [L, n, H]
        return np.asarray(group_norms(weighted, groups)) if groups else weighted

    meta = dict(label_weight="o_proj gain per head (wo_weighted_data.py)")
    if groups:
        meta.update(unit="group", units=groups)
    relabel(src, dst, weigh, **meta)


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
