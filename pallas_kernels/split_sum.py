"""`SplitSum`: a projection's output before its split-K epilogue, so that the next kernel can finish it.

A decode GEMV at small batch splits its reduction over several programs (too few output columns to keep
HBM busy otherwise) and writes float32 partials; an XLA epilogue then sums them, adds the bias and casts.
At B=1 that epilogue, and the residual add after it, are kernels of their own (~1.5-3 us of launch each
for 16 KB of data). Ops that take `split_sum=True` return this instead, and `add_row_norm` does the
epilogue, the residual add and the next norm in one kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitSum:
    """The output y [rows, cols] = (sum_s parts[s, :rows, :cols] + bias).astype(dtype).

    `parts` is [S, R, C] with R >= rows, C >= cols (a kernel may leave padding): float32 partial sums, or
    (S = 1, bias None) an output already finished by its kernel. Its total is rounded to `dtype` once,
    exactly as the epilogue it replaces rounds it."""

    parts: jax.Array
    bias: jax.Array | None
    rows: int = dataclasses.field(metadata=dict(static=True))
    cols: int = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def finished(cls, y: jax.Array) -> "SplitSum":
        """An output its kernel finished itself (no split, bias applied): y [rows, cols]."""
        return cls(y[None], None, y.shape[0], y.shape[1], jnp.dtype(y.dtype))

    @classmethod
    def of_partials(cls, parts: jax.Array, bias: jax.Array | None, rows: int, cols: int, dtype) -> "SplitSum":
        """Partial sums parts [S, >= rows, >= cols] (float32) of an output that still needs `bias` and the
        cast to `dtype`. (Checked here, not in __init__: pytree unflattening rebuilds the object with
        placeholder leaves.)"""
        if parts.ndim != 3 or parts.shape[1] < rows or parts.shape[2] < cols:
            raise ValueError(f"parts must be [S, >= {rows}, >= {cols}], got {parts.shape}")
        if bias is not None and tuple(bias.shape) != (cols,):
            raise ValueError(f"bias must have shape ({cols},), got {tuple(bias.shape)}")
        return cls(parts, bias, rows, cols, jnp.dtype(dtype))

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def total(self) -> jax.Array:
        """The finished output [rows, cols] through XLA (the epilogue the deferral skipped)."""
        if self.parts.shape[0] == 1 and self.bias is None and self.parts.dtype == self.dtype:
            return self.parts[0, :self.rows, :self.cols]
        y = jnp.sum(self.parts[:, :self.rows, :self.cols].astype(F32), axis=0)
        if self.bias is not None:
            y = y + self.bias.astype(F32)[None, :]
        return y.astype(self.dtype)
