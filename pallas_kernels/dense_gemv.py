"""Decode GEMV: `gemv(x, w, bias, activation, layout)` = act(x @ W + b) for M <= 32 rows.

The dense projections of a small-batch decode step are weight streams: at B=1 the whole step is a
sequence of GEMVs, and XLA's GEMM fusions read the H200's HBM at 2.5-3.0 TB/s on them
(benchmarks/results/decode_sparse_2026-11-28_notes.md). `layout` names how W is stored, so the model's
weights are used where they are: "kn" is [K, N] (in, out: the attention projections, the MLP down
projection), "nk" is [N, K] (out-major: the neuron-major MLP up/gate projections).
"""
from __future__ import annotations

import jax

from . import dense_gemv_triton as tri
from .activations import ACTIVATIONS
from .backends import dispatch
from .dense_gemv_xla import LAYOUTS, gemv_xla, product_f32
from .split_sum import SplitSum
from .validation import check_float, check_ndim, check_same_dtype

Array = jax.Array
# `label` names the Triton kernel for profiles (gemv_<layout>_<label>); XLA's dot has no name of its own to give
_IMPLS = {"xla": lambda x, w, b, a, lay, label: gemv_xla(x, w, b, a, lay),
          "triton": lambda x, w, b, a, lay, label: tri.gemv(x, w, b, a, lay, name=kernel_name(lay, label))}
_SPLIT = {"xla": lambda x, w, b, a, lay, label: SplitSum.finished(gemv_xla(x, w, b, a, lay)),
          "triton": lambda x, w, b, a, lay, label: tri.gemv(x, w, b, a, lay, defer=True, name=kernel_name(lay, label))}


def kernel_name(layout: str, label: str | None = None) -> str:
    """The GEMV kernel's name in profiles: gemv_<layout>, or gemv_<layout>_<label> (e.g. the part of the decode step
    the projection belongs to, which `polar_jax.bench.breakdown` reads back)."""
    if label is None:
        return f"gemv_{layout}"
    if not isinstance(label, str) or not label.isidentifier():
        raise ValueError(f"label must be an identifier (it becomes part of a kernel name), got {label!r}")
    return f"gemv_{layout}_{label}"


def check_gemv(x, w, bias, activation, layout: str) -> None:
    check_ndim("x", x, 2)
    check_ndim("w", w, 2)
    check_float("x", x)
    check_same_dtype(x=x, w=w)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    M, K = x.shape
    if not 1 <= M <= tri.MAX_M:
        raise ValueError(f"gemv takes 1 to {tri.MAX_M} rows of x, got {M}")
    k_w, n = (w.shape[0], w.shape[1]) if layout == "kn" else (w.shape[1], w.shape[0])
    if k_w != K:
        raise ValueError(f"x is [M, K={K}] but w ({layout}) is {w.shape}: its K is {k_w}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def gemv(x: Array, w: Array, bias: Array | None = None, activation: str | None = None, layout: str = "kn",
         impl: str = "auto", *, split_sum: bool = False, label: str | None = None) -> Array | SplitSum:
    """act(x @ W + b): x [M, K] (M <= 32), W [K, N] ("kn") or [N, K] ("nk") -> [M, N] in x's dtype,
    float32 accumulation. `split_sum=True` (no activation): the output as a `SplitSum`, its split-K
    epilogue left to the consumer (`add_row_norm`). `label`: see `kernel_name` (changes nothing computed)."""
    check_gemv(x, w, bias, activation, layout)
    if split_sum and activation is not None:
        raise ValueError(f"split_sum leaves the epilogue to the consumer: no activation, got {activation!r}")
    kernel_name(layout, label)  # a bad label fails here, whichever backend runs
    return dispatch("gemv", _SPLIT if split_sum else _IMPLS, impl)(x, w, bias, activation, layout, label)


_F32 = {"xla": lambda x, w, lay, label: product_f32(x, w, lay),
        "triton": lambda x, w, lay, label: tri.gemv_f32(x, w, lay, name=kernel_name(lay, label))}


def gemv_f32(x: Array, w: Array, layout: str = "nk", impl: str = "auto", *, label: str | None = None) -> Array:
    """x @ W in float32, not rounded to x's dtype: x [M, K] (M <= 32), W [K, N] ("kn") or [N, K] ("nk"). For
    narrow products whose consumers read float32 scores (the routers' first product): the Pallas kernel splits
    the reduction over enough programs to fill the GPU and sums the float32 partials once. `label`: as `gemv`'s."""
    check_gemv(x, w, None, None, layout)
    kernel_name(layout, label)  # a bad label fails here, whichever backend runs
    return dispatch("gemv_f32", _F32, impl)(x, w, layout, label)


# Where the decode step is faster with the Pallas GEMV: per layout, the (first, last) row counts of each range.
# H200: at B=1 the whole step (OPT-6.7B 1.06x, LLaMA-2-7B 1.24x over XLA's dot;
# benchmarks/results/decode_gemv_2026-11-29.md). With every projection on the GEMV up to M=4 the step was
# slower (0.96-0.97x), but the out-major MLP weights alone (up/gate) gain up to 16 rows: 1.1 % at B=8
# (OPT-6.7B dense) and B=16 (LLaMA-2-7B dense and heads), none slower
# (benchmarks/results/raw_2026-11-29b_h200/call4_step_variants_b8_b16.json, call5 for B=4).
# H100, 17-32 rows (a 32-row x tile): at OPT-6.7B B=32 XLA runs the attention projections as split-K GEMMs
# with an epilogue kernel each. Every projection on the GEMV made the dense step 2.8 % and the heads + MLP
# step 1.2 % faster than this rule without 17-32; the (in, out) weights alone gave the sparse step the same
# and the dense step 1.1 % less (benchmarks/results/raw_2026-12-07_h100/call7_variants_skinny.json; call6
# the first A/B). Not measured on the H200 there.
GEMV_ROWS = {"nk": ((1, 32),), "kn": ((1, 1), (17, 32))}


def prefers_gemv(m: int, layout: str) -> bool:
    """True where the decode projections of m rows should use `gemv` rather than XLA's dot."""
    return any(lo <= m <= hi for lo, hi in GEMV_ROWS[layout])
