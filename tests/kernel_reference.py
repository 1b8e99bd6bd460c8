"""Float64 NumPy references for the selective kernels (independent of JAX)."""
from __future__ import annotations

import math
import os
import zlib

import numpy as np


def seeded_rng() -> np.random.Generator:
    """A generator seeded from the running test's id: the same inputs in every run and process (a failure
    reproduces), different inputs per test. POLAR_TEST_SEED=N shifts every seed to explore other inputs."""
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    seed = (zlib.crc32(test_id.encode()) + int(os.environ.get("POLAR_TEST_SEED", "0"))) % 2**32
    print(f"seed={seed} ({test_id})")
    return np.random.default_rng(seed)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


ACTS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    None: lambda x: x,
}


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def gemv_ref(x, w, bias=None, activation=None, layout="kn"):
    """act(x @ W + b) in float64; W is [K, N] ("kn") or [N, K] ("nk")."""
    w = f64(w) if layout == "kn" else f64(w).T
    y = f64(x) @ w
    if bias is not None:
        y = y + f64(bias)
    return ACTS[activation](y)


def unit_columns_ref(x, w, bias, units, n, width):
    """x @ W + b on the columns of the units in the first n slots, NaN elsewhere (unspecified there)."""
    y = gemv_ref(x, w, bias)
    keep = np.zeros(w.shape[1], bool)
    for u in np.asarray(units)[: int(n)]:
        keep[u * width:(u + 1) * width] = True
    return np.where(keep[None, :], y, np.nan)


def unit_rows_ref(x, w, bias, units, n, width):
    """x @ W + b over the rows of the units in the first n slots (each unit counted once)."""
    x = f64(x)
    keep = np.zeros(w.shape[0], bool)
    for u in np.asarray(units)[: int(n)]:
        keep[u * width:(u + 1) * width] = True
    return gemv_ref(np.where(keep[None, :], x, 0.0), w, bias)


def gather_up_ref(x, w, idx, n, bias=None, activation="relu"):
    x, w = f64(x), f64(w)
    idx = np.asarray(idx)
    out = np.zeros((x.shape[0], idx.shape[0]))
    for j in range(int(n)):
        col = x @ w[idx[j]]
        if bias is not None:
            col = col + f64(bias)[idx[j]]
        out[:, j] = ACTS[activation](col)
    return out


def gather_up_gated_ref(x, wg, wu, idx, n):
    g = gather_up_ref(x, wg, idx, n, None, None)
    u = gather_up_ref(x, wu, idx, n, None, None)
    return ACTS["silu"](g) * u


def gather_down_ref(h, w, idx, n, bias=None):
    h, w = f64(h), f64(w)
    out = np.zeros((h.shape[0], w.shape[1]))
    for j in range(int(n)):
        out += np.outer(h[:, j], w[int(idx[j])])
    if bias is not None:
        out += f64(bias)[None, :]
    return out


def select_decode_ref(q, k, v, lengths, groups, n_active, sm_scale=None, window=None):
    q, k, v = f64(q), f64(k), f64(v)
    B, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for b in range(B):
        L = int(lengths[b])
        lo = max(0, L - window) if window is not None else 0
        for g in sorted({int(groups[b, j]) for j in range(int(n_active[b]))}):
            if L - lo <= 0:
                continue
            for h in range(g * G, (g + 1) * G):
                s = k[b, lo:L, g] @ q[b, h] * scale
                p = np.exp(s - s.max())
                out[b, h] = (p / p.sum()) @ v[b, lo:L, g]
    return out


def unit_top_k_ref(scores, k, bias=None, offset=0, units=None):
    """Per row, the k largest of scores[:, offset:offset + units] + bias (float32 sum), ties to the lower id:
    a stable sort of the negated logits."""
    units = scores.shape[1] - offset if units is None else units
    logits = np.asarray(scores, np.float32)[:, offset:offset + units]
    if bias is not None:
        logits = logits + np.asarray(bias, np.float32)
    return np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int32)


def rel_err(out, ref) -> float:
    out, ref = f64(out), f64(ref)
    assert np.all(np.isfinite(out)), "non-finite output"
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (den if den > 0 else 1.0))
