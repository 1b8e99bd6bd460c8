"""Dense-vs-selective crossover for the MLP, measured per GPU class (crossover.json).

For each batch size M a class's table gives the active-neuron density above which the dense XLA
matmul over the whole weight is faster than the selective kernels. `mlp_prefers_dense` is the
decision `impl="auto"` uses, so the selective MLP is never slower than dense.

A class without its own measurement (devices.py: an A100 or L4 until one is benchmarked, or an
unknown GPU) takes the conservative table instead: for every measured class, the densities at which
the selective kernels beat dense by CONSERVATIVE_MARGIN (2x) in the same sweep, and the smallest of
those over the classes. Dense then takes over earlier: relative to dense, the kernels may run up to
2x slower there than where they were measured and still not lose.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from .devices import DeviceClass, current_device_class

PATH = Path(__file__).with_name("crossover.json")
CONSERVATIVE_MARGIN = 2.0


def _int_keys(table: dict[str, float]) -> dict[int, float]:
    return {int(k): float(v) for k, v in table.items()}


@functools.lru_cache(maxsize=None)
def load_crossover(path: str | None = None) -> dict[str, Any]:
    """The tables: {"classes": {class name: {"thresholds": {M: density}, "conservative": {M: density},
    "device": ..., "date": ...}}, "note": ...}."""
    with open(path or PATH) as f:
        data = json.load(f)
    for entry in data["classes"].values():
        entry["thresholds"] = _int_keys(entry["thresholds"])
        entry["conservative"] = _int_keys(entry["conservative"])
    return data


def thresholds_for(device: DeviceClass | None = None, data: dict[str, Any] | None = None) -> dict[int, float]:
    """{M: density} for a device class (default: this host's): its measured table, or the
    conservative table when the class has none."""
    data = data if data is not None else load_crossover()
    name = (device or current_device_class()).name
    entry = data["classes"].get(name)
    if entry is not None:
        return entry["thresholds"]
    tables = [e["conservative"] for e in data["classes"].values()]
    ms = sorted({m for t in tables for m in t})
    return {m: min(density_threshold(m, t) for t in tables) for m in ms}


def density_threshold(M: int, table: dict[int, float] | None = None) -> float:
    """Density above which dense wins at batch size M (table: {M: density}, default this host's).

    Between measured batch sizes the smaller neighbouring threshold is used and beyond the ends
    the nearest one, so an unmeasured M errs towards dense (never slower than dense)."""
    t = table if table is not None else thresholds_for()
    ms = sorted(t)
    if M <= ms[0]:
        return t[ms[0]]
    if M >= ms[-1]:
        return t[ms[-1]]
    lo = max(m for m in ms if m <= M)
    hi = min(m for m in ms if m >= M)
    return min(t[lo], t[hi])


def mlp_prefers_dense(M: int, n_active: Any, N: int, device: DeviceClass | None = None) -> Any:
    """True when a dense MLP beats the selective one for n_active of N neurons at batch M.

    Returns a Python bool for a concrete n_active, a traced boolean under jit (use lax.cond)."""
    thr = density_threshold(int(M), thresholds_for(device))
    if isinstance(n_active, int):
        return n_active > thr * N
    return jnp.asarray(n_active, jnp.float32) > thr * N
