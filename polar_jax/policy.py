"""The step-level policy: what a decode step sparsifies, so that sparse decoding is never slower than dense.

Whether sparsity pays depends on the batch size and the context (PAPER.md's polarity shift: MLP sparsity
pays at small batch, head sparsity at large batch and long context) and on how much the selection costs
on the device. `polar-jax bench decode --write-policy` measures every variant at a grid of (batch,
context) points and stores, per device kind and model class, the speedup of each variant over dense in
`decode_policy.json`. `choose_variant` picks the fastest variant of the nearest measured point when it is
at least `MARGIN` faster than dense, and dense otherwise: also when nothing was measured for this device
and model class, or the nearest point is more than a doubling of batch or context away (it never
guesses in favour of sparsity).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import jax

from polar_jax.config import ModelConfig

PATH = Path(__file__).with_name("decode_policy.json")
PARTS: dict[str, tuple[bool, bool]] = {"dense": (False, False), "heads": (True, False), "mlp": (False, True),
                                       "both": (True, True)}
MARGIN = 1.02  # a variant must beat dense by this much in the table to be chosen (timing noise)
MAX_DISTANCE = 1.0  # log2 units (batch doublings + context doublings) to the nearest measured point


def model_class(cfg: ModelConfig) -> str:
    """What decides the cost structure: the MLP kind (ReLU can be sparsified) and MHA vs GQA."""
    mlp = "relu" if cfg.relu_mlp else ("swiglu" if cfg.gated_mlp else "dense")
    return f"{mlp}-{'gqa' if cfg.num_kv_heads < cfg.num_heads else 'mha'}"


def device_kind() -> str:
    try:
        return jax.devices()[0].device_kind
    except RuntimeError:
        return "unknown"


@functools.lru_cache(maxsize=None)
def load_table(path: str | None = None) -> dict[str, Any]:
    p = Path(path) if path else PATH
    if not p.is_file():
        return {"entries": []}
    return json.loads(p.read_text())


def choose_variant(cfg: ModelConfig, batch: int, context: int, mlp_available: bool,
                   table: dict[str, Any] | None = None, device: str | None = None) -> str:
    """"dense", "heads", "mlp" or "both" for a decode batch of `batch` rows reaching `context` tokens."""
    table = load_table() if table is None else table
    device = device_kind() if device is None else device
    cls = model_class(cfg)
    entries = [e for e in table.get("entries", []) if e["device"] == device and e["model_class"] == cls]
    if not entries:
        return "dense"

    def distance(e):
        return abs(math.log2(e["batch"] / batch)) + abs(math.log2(e["context"] / max(context, 1)))

    best = min(entries, key=distance)
    if distance(best) > MAX_DISTANCE:
        return "dense"  # too far from anything measured: never guess in favour of sparsity
    speedups = {v: s for v, s in best["speedup"].items() if v in PARTS and (mlp_available or not PARTS[v][1])}
    if not speedups:
        return "dense"
    variant = max(speedups, key=speedups.get)
    return variant if speedups[variant] >= MARGIN and variant != "dense" else "dense"
