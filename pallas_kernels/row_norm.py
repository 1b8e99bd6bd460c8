"""Decode-step norm: `row_norm(x, weight, bias, eps, kind)`, LayerNorm ("layer") or RMSNorm ("rms") of
each row of x [M, D], in one kernel per call at small batch (see row_norm_triton.py for why).
`add_row_norm(x, delta, ...)` first adds a sublayer's unfinished output (a `SplitSum`) to the residual
stream x, in the same kernel, and returns both the new stream and its norm."""
from __future__ import annotations

import jax

from . import row_norm_triton as tri
from .backends import dispatch
from .row_norm_xla import KINDS, add_row_norm_xla, row_norm_xla
from .split_sum import SplitSum
from .validation import check_float, check_ndim

Array = jax.Array
_IMPLS = {"xla": row_norm_xla, "triton": tri.row_norm}
_ADD_IMPLS = {"xla": add_row_norm_xla, "triton": tri.add_row_norm}

# Rows up to which the decode step normalises with `row_norm` instead of XLA's fusions. H200, same-process
# A/B (benchmarks/results/raw_2026-11-29c_h200/call4_*_variants.json): at B=1 OPT-6.7B dense and heads + MLP
# 2.5 % faster, LLaMA-2-7B (RMSNorm: two XLA kernels, not three) 0.9 % and 0.4 %; up to 16 rows it was
# 0.3-1.6 % slower at B=8 and B=16, where one program per row is too little work per launch.
ROW_NORM_MAX_M = 1


def check_row_norm(x, weight, bias, eps, kind) -> None:
    check_ndim("x", x, 2)
    check_float("x", x)
    D = x.shape[1]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if tuple(weight.shape) != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
    if bias is not None and kind == "rms":
        raise ValueError("RMSNorm has no bias")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")


def row_norm(x: Array, weight: Array, bias: Array | None, eps: float, kind: str, impl: str = "auto") -> Array:
    """LayerNorm or RMSNorm of each row of x [M, D] (float32 statistics) -> [M, D]."""
    check_row_norm(x, weight, bias, eps, kind)
    return dispatch("row_norm", _IMPLS, impl)(x, weight, bias, float(eps), kind)


def prefers_row_norm(m: int) -> bool:
    """True where a decode step of m rows should normalise with `row_norm`."""
    return 1 <= m <= ROW_NORM_MAX_M


def add_row_norm(x: Array, delta: SplitSum, weight: Array, bias: Array | None, eps: float, kind: str,
                 impl: str = "auto") -> tuple[Array, Array]:
    """x [M, D] + delta.total() (the finished output of the projection before this norm) -> (that sum, its
    LayerNorm or RMSNorm), float32 statistics; one kernel on the Triton backend."""
    check_row_norm(x, weight, bias, eps, kind)
    if not isinstance(delta, SplitSum):
        raise TypeError(f"delta must be a SplitSum (a projection's split_sum=True output), got {type(delta).__name__}")
    if delta.shape != tuple(x.shape):
        raise ValueError(f"delta is {delta.shape} but x is {tuple(x.shape)}")
    return dispatch("add_row_norm", _ADD_IMPLS, impl)(x, delta, weight, bias, float(eps), kind)
