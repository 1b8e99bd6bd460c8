"""GEMVs over attention units for the decode step (M <= 32 rows of x, (in, out) weights).

- `gemv_multi(x, ws, biases, units, n_active, width, f32_nk=None)`: x @ W_i + b_i for several weights in one
  launch (Q, K and V), and optionally an out-major weight's product in float32 (the routers' first product).
  With `units`, the first output is computed only on the columns of the units in the first
  `n_active` slots (a unit is `width` contiguous columns: one KV group's query heads); its other columns
  are unspecified on the Triton backend (zero on XLA): only the selected heads' queries are read later.
- `gemv_rows(x, w, bias, units, n_active, width)`: x @ W + b over the rows of the selected units only
  (the output projection of the selected heads).
"""
from __future__ import annotations

from typing import Sequence

import jax

from . import unit_gemv_triton as tri
from .backends import dispatch
from .split_sum import SplitSum
from .unit_gemv_xla import gemv_multi_xla, gemv_rows_xla
from .validation import check_count, check_float, check_indices, check_int, check_ndim, check_same_dtype

Array = jax.Array
_MULTI = {"xla": gemv_multi_xla, "triton": tri.gemv_multi}
_ROWS = {"xla": gemv_rows_xla, "triton": tri.gemv_rows}
_ROWS_SPLIT = {"xla": lambda *a: SplitSum.finished(gemv_rows_xla(*a)),
               "triton": lambda *a: tri.gemv_rows(*a, defer=True)}


def _check_x(x) -> tuple[int, int]:
    check_ndim("x", x, 2)
    check_float("x", x)
    M, K = x.shape
    if not 1 <= M <= tri.MAX_M:
        raise ValueError(f"unit GEMVs take 1 to {tri.MAX_M} rows of x, got {M}")
    return M, K


def _check_units(units, n_active, width, span: int, what: str) -> None:
    check_ndim("units", units, 1)
    check_int("units", units)
    if not isinstance(width, int) or width < 16 or width % 16:
        raise ValueError(f"width (columns per unit) must be a positive multiple of 16, got {width!r}")
    if span % width:
        raise ValueError(f"the {what} ({span}) is not a whole number of units of width {width}")
    check_count("n_active", n_active, units.shape[0], "units")
    check_indices("units", units, n_active, span // width, "unit ids")


def gemv_multi(x: Array, ws: Sequence[Array], biases: Sequence[Array | None] | None = None,
               units: Array | None = None, n_active: Array | int | None = None, width: int | None = None,
               impl: str = "auto", *, f32_nk: Array | None = None) -> tuple[Array, ...]:
    """(x @ W_i + b_i for every weight), W_i [K, N_i]; the first restricted to the selected units' columns
    when `units` is given. Outputs in x's dtype, float32 accumulation. `f32_nk` [N, K] (out-major, x's dtype):
    x @ f32_nk.T is one more output, last, in float32 (never rounded), from the same launch."""
    M, K = _check_x(x)
    if not ws:
        raise ValueError("gemv_multi needs at least one weight")
    biases = tuple(biases) if biases is not None else (None,) * len(ws)
    if len(biases) != len(ws):
        raise ValueError(f"{len(ws)} weights but {len(biases)} biases")
    for i, (w, b) in enumerate(zip(ws, biases)):
        check_ndim(f"ws[{i}]", w, 2)
        check_same_dtype(x=x, w=w)
        if w.shape[0] != K:
            raise ValueError(f"x is [M, K={K}] but ws[{i}] is {w.shape}: weights are [K, N]")
        if b is not None and tuple(b.shape) != (w.shape[1],):
            raise ValueError(f"biases[{i}] must have shape ({w.shape[1]},), got {tuple(b.shape)}")
    if units is not None:
        if n_active is None:
            raise ValueError("units need n_active")
        _check_units(units, n_active, width, ws[0].shape[1], "first weight's columns")
    if f32_nk is not None:
        check_ndim("f32_nk", f32_nk, 2)
        check_same_dtype(x=x, f32_nk=f32_nk)
        if f32_nk.shape[1] != K:
            raise ValueError(f"x is [M, K={K}] but f32_nk is {f32_nk.shape}: it is [N, K] (out-major)")
    return tuple(dispatch("gemv_multi", _MULTI, impl)(x, tuple(ws), biases, units, n_active, width, f32_nk))


def gemv_rows(x: Array, w: Array, bias: Array | None, units: Array, n_active: Array | int, width: int,
              impl: str = "auto", *, split_sum: bool = False) -> Array | SplitSum:
    """x @ W + b over the rows of the units in the first n_active slots: x [M, K], W [K, N] -> [M, N].
    `split_sum=True`: as a `SplitSum` (see `gemv`)."""
    M, K = _check_x(x)
    check_ndim("w", w, 2)
    check_same_dtype(x=x, w=w)
    if w.shape[0] != K:
        raise ValueError(f"x is [M, K={K}] but w is {w.shape}: the weight is [K, N]")
    if bias is not None and tuple(bias.shape) != (w.shape[1],):
        raise ValueError(f"bias must have shape ({w.shape[1]},), got {tuple(bias.shape)}")
    _check_units(units, n_active, width, K, "rows of w")
    return dispatch("gemv_rows", _ROWS_SPLIT if split_sum else _ROWS, impl)(x, w, bias, units, n_active, width)
