"""Per-sequence top-k of the attention units: `unit_top_k(scores, k, bias, offset=, units=)`.

The decode step picks each sequence's k best heads (KV groups) from its router's logits, U <= 128 of them.
In XLA that ranking is two reduction kernels per layer (every unit's rank, then the unit of each rank), and
adding the router's bias (or slicing the head router's columns out of the product it shares with the MLP
router) was part of them or one more. Here it is one kernel that reads the raw product: the logits of row b
are scores[b, offset:offset + units] + bias, in float32. Returns [B, k] int32 unit ids in score order (ties:
the lower id first), exactly `top_units` of those logits."""
from __future__ import annotations

import jax

from . import unit_top_k_triton as tri
from .backends import dispatch
from .unit_top_k_xla import unit_top_k_xla
from .validation import check_float, check_ndim

Array = jax.Array
_IMPLS = {"xla": unit_top_k_xla, "triton": tri.unit_top_k}
MAX_UNITS = tri.MAX_UNITS


def check_unit_top_k(scores, k, bias, offset, units) -> None:
    check_ndim("scores", scores, 2)
    check_float("scores", scores)
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if not isinstance(units, int) or not 1 <= units <= scores.shape[1] - offset:
        raise ValueError(f"units must be an int in [1, {scores.shape[1] - offset}] (the columns after offset "
                         f"{offset} of scores {tuple(scores.shape)}), got {units!r}")
    if units > MAX_UNITS:
        raise ValueError(f"unit_top_k ranks at most {MAX_UNITS} units per row, got {units}")
    if not isinstance(k, int) or not 1 <= k <= units:
        raise ValueError(f"k must be an int in [1, {units}], got {k!r}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (units,):
            raise ValueError(f"bias must have shape ({units},), got {tuple(bias.shape)}")


def unit_top_k(scores: Array, k: int, bias: Array | None = None, *, offset: int = 0, units: int | None = None,
               impl: str = "auto") -> Array:
    """[B, k] int32: per row, the ids of the k largest of scores[:, offset:offset + units] + bias (float32),
    best first, ties to the lower id. `units` defaults to every column after `offset`."""
    check_ndim("scores", scores, 2)
    units = scores.shape[1] - offset if units is None and isinstance(offset, int) else units
    check_unit_top_k(scores, k, bias, offset, units)
    return dispatch("unit_top_k", _IMPLS, impl)(scores, k, bias, offset, units)
