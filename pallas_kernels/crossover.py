"""Dense-vs-selective crossover for the MLP, measured on the GPU (crossover.json).

For each batch size M the table gives the active-neuron density above which the dense XLA
matmul over the whole weight is faster than the selective kernels. `mlp_prefers_dense` is the
decision `impl="auto"` uses, so the selective MLP is never slower than dense.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

PATH = Path(__file__).with_name("crossover.json")


@functools.lru_cache(maxsize=None)
def load_crossover(path: str | None = None) -> dict[str, Any]:
    """The crossover table: {"thresholds": {M: density}, "device": ..., "date": ...}."""
    with open(path or PATH) as f:
        data = json.load(f)
    data["thresholds"] = {int(k): float(v) for k, v in data["thresholds"].items()}
    return data


def density_threshold(M: int, table: dict[int, float] | None = None) -> float:
    """Density above which dense wins at batch size M.

    Between measured batch sizes the smaller neighbouring threshold is used and beyond the ends
    the nearest one, so an unmeasured M errs towards dense (never slower than dense)."""
    t = table if table is not None else load_crossover()["thresholds"]
    ms = sorted(t)
    if M <= ms[0]:
        return t[ms[0]]
    if M >= ms[-1]:
        return t[ms[-1]]
    lo = max(m for m in ms if m <= M)
    hi = min(m for m in ms if m >= M)
    return min(t[lo], t[hi])


def mlp_prefers_dense(M: int, n_active: Any, N: int) -> Any:
    """True when a dense MLP beats the selective one for n_active of N neurons at batch M.

    Returns a Python bool for a concrete n_active, a traced boolean under jit (use lax.cond)."""
    thr = density_threshold(int(M))
    if isinstance(n_active, int):
        return n_active > thr * N
    return jnp.asarray(n_active, jnp.float32) > thr * N
