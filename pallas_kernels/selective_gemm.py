"""Selective GEMMs for contextually sparse MLPs: public API, validation and dispatch.

Weights are neuron-major (up/gate [N, K], down [N, D]) so an active neuron is one contiguous
row. `idx` holds A slots (static capacity) of which the first `n_active` (int32, may be traced)
are live; one compiled kernel serves every density.

impl (see backends.py): "xla" (reference, any backend), "triton" (Pallas Triton; interpret mode
without a CUDA GPU), "auto" (Triton on CUDA cc >= 8.0 with a dense fallback above the measured
crossover density, XLA elsewhere). Tilings are the Triton backend's business:
`pallas_kernels.triton` takes a config for benchmarks.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import selective_gemm_triton as tri
from . import selective_gemm_xla as ref
from .activations import ACTIVATIONS
from .backends import dispatch
from .crossover import mlp_prefers_dense
from .split_sum import SplitSum
from .validation import check_count, check_float, check_indices, check_int, check_ndim, check_same_dtype, concrete

Array = jax.Array


def _check_idx(idx: Any, n_active: Any, N: int) -> None:
    check_ndim("idx", idx, 1)
    check_int("idx", idx)
    if jnp.ndim(n_active) != 0:
        raise ValueError(f"n_active must be a scalar, got shape {jnp.shape(n_active)}")
    check_int("n_active", n_active)
    check_count("n_active", n_active, idx.shape[0], "slots")
    check_indices("idx", idx, n_active, N, "neuron indices")


def _check_up(x: Any, ws: dict[str, Any], idx: Any, n_active: Any, bias: Any) -> None:
    check_ndim("x", x, 2)
    check_float("x", x)
    for name, w in ws.items():
        check_ndim(name, w, 2)
        if w.shape[1] != x.shape[1]:
            raise ValueError(f"{name} is [N, K] with K = x.shape[1] = {x.shape[1]}, got {w.shape}")
    shapes = {w.shape for w in ws.values()}
    if len(shapes) > 1:
        raise ValueError(f"gate and up weights must have one shape, got {sorted(shapes)}")
    check_same_dtype(x=x, bias=bias, **ws)
    N = next(iter(ws.values())).shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {bias.shape}")
    _check_idx(idx, n_active, N)


def check_up(x: Any, ws: dict[str, Any], idx: Any, n_active: Any, bias: Any, activation: Any = "relu") -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_up(x, ws, idx, n_active, bias)


def check_down(h: Any, w: Any, idx: Any, n_active: Any, bias: Any) -> None:
    check_ndim("h", h, 2)
    check_ndim("w", w, 2)
    check_float("h", h)
    check_same_dtype(h=h, w=w, bias=bias)
    _check_idx(idx, n_active, w.shape[0])
    if h.shape[1] != idx.shape[0]:
        raise ValueError(f"h is [M, A] with A = len(idx) = {idx.shape[0]}, got {h.shape}")
    if bias is not None and tuple(bias.shape) != (w.shape[1],):
        raise ValueError(f"bias must have shape ({w.shape[1]},), got {bias.shape}")


_UP = {"xla": lambda x, w, idx, n, bias, act: ref.gather_up_xla(x, w, idx, n, bias, act),
       "triton": lambda x, w, idx, n, bias, act: tri.gather_up(x, w, idx, n, bias, act)}
_GATED = {"xla": ref.gather_up_gated_xla, "triton": tri.gather_up_gated}
_DOWN = {"xla": ref.gather_down_xla, "triton": tri.gather_down}
_DOWN_SPLIT = {"xla": lambda *a: SplitSum.finished(ref.gather_down_xla(*a)),
               "triton": lambda *a: tri.gather_down(*a, defer=True)}


def gather_up(x: Array, w: Array, idx: Array, n_active: Array | int, bias: Array | None = None,
              activation: str | None = "relu", impl: str = "auto") -> Array:
    """out[:, j] = act(x . w[idx[j]] + bias[idx[j]]) for j < n_active; zero columns beyond.

    x [M, K], w [N, K], idx int32 [A], n_active int32 scalar -> [M, A] in x.dtype (f32 accumulate)."""
    check_up(x, {"w": w}, idx, n_active, bias, activation)
    n = jnp.asarray(n_active, jnp.int32)
    fn = dispatch("gather_up", _UP, impl)
    if impl != "auto" or fn is _UP["xla"]:
        return fn(x, w, idx, n, bias, activation)
    dense = lambda x, w, idx, n, bias: ref.dense_up_then_take(x, w, idx, n, bias, activation)  # noqa: E731
    sparse = lambda x, w, idx, n, bias: fn(x, w, idx, n, bias, activation)  # noqa: E731
    return _choose(x.shape[0], n_active, n, w.shape[0], dense, sparse, (x, w, idx, n, bias))


def gather_up_gated(x: Array, w_gate: Array, w_up: Array, idx: Array, n_active: Array | int,
                    impl: str = "auto") -> Array:
    """SwiGLU up projection: silu(x . w_gate[idx]^T) * (x . w_up[idx]^T), zeros beyond n_active.

    Gate and up rows are gathered in one pass (one kernel, both accumulators)."""
    check_up(x, {"w_gate": w_gate, "w_up": w_up}, idx, n_active, None)
    n = jnp.asarray(n_active, jnp.int32)
    fn = dispatch("gather_up_gated", _GATED, impl)
    if impl != "auto" or fn is _GATED["xla"]:
        return fn(x, w_gate, w_up, idx, n)
    return _choose(x.shape[0], n_active, n, w_gate.shape[0], ref.dense_gated_then_take, fn,
                   (x, w_gate, w_up, idx, n))


def gather_down(h: Array, w: Array, idx: Array, n_active: Array | int, bias: Array | None = None,
                impl: str = "auto", *, split_sum: bool = False) -> Array | SplitSum:
    """sum_{j < n_active} h[:, j] * w[idx[j]] + bias -> [M, D] (duplicates count twice).

    h [M, A], w [N, D] (neuron-major down projection), idx int32 [A], n_active int32 scalar.
    `split_sum=True` (a named backend, not "auto"): the output as a `SplitSum`, its epilogue (partials'
    sum, bias, cast) left to the consumer (`add_row_norm`)."""
    check_down(h, w, idx, n_active, bias)
    n = jnp.asarray(n_active, jnp.int32)
    if split_sum:
        if impl == "auto":
            raise ValueError("split_sum needs a named backend (impl='triton' or 'xla'), not 'auto'")
        return dispatch("gather_down", _DOWN_SPLIT, impl)(h, w, idx, n, bias)
    fn = dispatch("gather_down", _DOWN, impl)
    if impl != "auto" or fn is _DOWN["xla"]:
        return fn(h, w, idx, n, bias)
    return _choose(h.shape[0], n_active, n, w.shape[0], ref.dense_scatter_down, fn, (h, w, idx, n, bias))


def _choose(M: int, n_active: Any, n: Array, N: int, dense, sparse, args: tuple) -> Array:
    """Dense above the measured crossover density, selective below.

    A concrete count decides on the host; a traced one compiles both paths under lax.cond, so
    one executable still serves every density."""
    c = concrete(n_active)
    if c is not None:
        return dense(*args) if mlp_prefers_dense(M, int(c), N) else sparse(*args)
    return jax.lax.cond(mlp_prefers_dense(M, n, N), dense, sparse, *args)
