"""XLA references of the unit GEMVs (pallas_kernels/unit_gemv.py): the same values by masking.

Columns / rows of units that are not selected are zeroed with `where` (not multiplied), so whatever
the unselected inputs hold (the kernel leaves unselected query columns unwritten) cannot leak in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def unit_mask(units: jax.Array, n_active: jax.Array, num_units: int) -> jax.Array:
    """[num_units] bool: the units in the first n_active slots."""
    live = jnp.arange(units.shape[0]) < n_active
    return jnp.zeros((num_units,), bool).at[jnp.where(live, units, num_units)].set(True, mode="drop")


def _proj(x, w, b):
    y = jnp.einsum("mk,kn->mn", x, w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)[None, :]
    return y.astype(x.dtype)


def gemv_multi_xla(x, ws, biases, units=None, n_active=None, width=None, f32_nk=None):
    outs = [_proj(x, w, b) for w, b in zip(ws, biases)]
    if units is not None:
        keep = jnp.repeat(unit_mask(units, n_active, ws[0].shape[1] // width), width)
        outs[0] = jnp.where(keep[None, :], outs[0], 0)
    if f32_nk is not None:
        outs.append(jnp.einsum("mk,nk->mn", x, f32_nk, preferred_element_type=jnp.float32))
    return tuple(outs)


def gemv_rows_xla(x, w, bias, units, n_active, width):
    keep = jnp.repeat(unit_mask(units, n_active, w.shape[0] // width), width)
    return _proj(jnp.where(keep[None, :], x, 0), w, bias)
