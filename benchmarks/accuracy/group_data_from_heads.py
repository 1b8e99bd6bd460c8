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

import numpy as np

from polar_jax.models.collect import group_norms
from polar_jax.routers.collect import META_FILE, CollectedData


def derive(src: Path, dst: Path, num_kv_heads: int) -> None:
    data = CollectedData(src)
    if data.meta["unit"] != "head":
        raise SystemExit(f"{src} is not a per-head collection (unit={data.meta['unit']!r})")
    dst.mkdir(parents=True, exist_ok=False)
    for f in sorted(src.iterdir()):
        if f.name == META_FILE:
            continue
        if f.name.endswith(".unit_norm.npy"):
            heads = np.load(f, allow_pickle=False)
            np.save(dst / f.name, np.asarray(group_norms(heads, num_kv_heads), np.float32), allow_pickle=False)
        else:
            os.link(f, dst / f.name)
    meta = dict(data.meta, unit="group", units=num_kv_heads, derived_from=str(src))
    (dst / META_FILE).write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    derive(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
