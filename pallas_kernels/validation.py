"""Input checks shared by the public wrappers: clear errors on the host, silent under tracing.

Values (counts, indices) are only checked when they are concrete; traced values pass through
(the kernels clamp indices, so a bad traced value gives wrong numbers, never a crash)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def concrete(x: Any) -> np.ndarray | None:
    """NumPy value of x if it is known on the host, else None (tracers)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 - anything not convertible is treated as unknown
        return None


def check_ndim(name: str, x: Any, ndim: int) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {jnp.shape(x)}")


def check_float(name: str, x: Any) -> None:
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")


def check_same_dtype(**arrays: Any) -> None:
    dts = {k: jnp.dtype(v.dtype) for k, v in arrays.items() if v is not None}
    if len(set(dts.values())) > 1:
        raise TypeError(f"dtype mismatch: {', '.join(f'{k}={d}' for k, d in dts.items())}")


def check_int(name: str, x: Any) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {jnp.result_type(x)}")


def check_kernel_dtype(dtype: Any, interpret: bool) -> None:
    """The Triton kernels run bf16/fp16 on the GPU; float32 only in interpret mode."""
    dt = jnp.dtype(dtype)
    if dt in KERNEL_DTYPES or (interpret and dt == jnp.dtype(jnp.float32)):
        return
    raise TypeError(f"impl='triton' supports bfloat16/float16 inputs on the GPU (float32 only in "
                    f"interpret mode), got {dt}; use impl='xla' for float32")


def check_count(name: str, n: Any, capacity: int, cap_name: str) -> None:
    c = concrete(n)
    if c is None:
        return
    if c.size and (c.min() < 0 or c.max() > capacity):
        raise ValueError(f"{name} must lie in [0, {cap_name}={capacity}], got {c.tolist()}")


def check_indices(name: str, idx: Any, n_active: Any, upper: int, what: str) -> None:
    """Active entries (slots < n_active) of idx must be in [0, upper)."""
    ci, cn = concrete(idx), concrete(n_active)
    if ci is None or cn is None:
        return
    slots = np.arange(ci.shape[-1])
    live = slots[None, :] < np.reshape(cn, (-1, 1)) if ci.ndim == 2 else slots < cn
    bad = live & ((ci < 0) | (ci >= upper))
    if bad.any():
        raise ValueError(f"{name}: active entries must be {what} in [0, {upper}); "
                         f"out of range: {np.unique(ci[bad]).tolist()[:8]}")
