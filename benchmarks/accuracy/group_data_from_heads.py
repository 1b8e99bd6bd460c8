"""Derive KV-group router data from a per-query-head collection (`polar-jax collect --unit head`).

A KV group's label score is the sum of its query heads' output norms (`models.collect.group_norms`,
exactly what `collect` stores for a GQA model by default), and every other field is the same, so one dense
pass over the text serves both router granularities: the other files are linked, not copied.

    python benchmarks/accuracy/group_data_from_heads.py HEAD_DATA GROUP_DATA NUM_KV_HEADS
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from polar_jax.models.collect import group_norms
from polar_jax.routers.collect import META_FILE, CollectedData


def relabel(src: Path, dst: Path, transform: Callable[[np.ndarray], np.ndarray], **meta_update: Any) -> None:
    """Copy a per-head collection to `dst` with every chunk's `unit_norm` [L, n, H] replaced by
    `transform(unit_norm)` and `meta_update` merged into its marker; the other files are hard links (the
    router inputs are most of the bytes and stay the same)."""
    data = CollectedData(src)
    if data.meta["unit"] != "head":
        raise SystemExit(f"{src} is not a per-head collection (unit={data.meta['unit']!r})")
    dst.mkdir(parents=True, exist_ok=False)
    for f in sorted(src.iterdir()):
        if f.name == META_FILE:
            continue
        if f.name.endswith(".unit_norm.npy"):
            labels = transform(np.load(f, allow_pickle=False))
            np.save(dst / f.name, np.asarray(labels, np.float32), allow_pickle=False)
        else:
            os.link(f, dst / f.name)
    meta = dict(data.meta, derived_from=str(src), **meta_update)
    (dst / META_FILE).write_text(json.dumps(meta, indent=1))


def derive(src: Path, dst: Path, num_kv_heads: int) -> None:
    relabel(src, dst, lambda heads: group_norms(heads, num_kv_heads), unit="group", units=num_kv_heads)


if __name__ == "__main__":
    derive(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
