"""Slot -> head bookkeeping of the XLA attention reference (the Pallas path does the same
mapping inside its finish kernel, selective_attention_triton.finish_program)."""
from __future__ import annotations

import jax.numpy as jnp


def scatter_slots(slot_out, groups, n_active, Hkv: int, out_dtype):
    """[B, A, G, D] per-slot outputs -> [B, Hkv*G, D]; heads of unselected groups are zero.

    Inactive slots are sent to an out-of-range group and dropped; a group listed twice is
    written twice with the same value (set, not add), so duplicates do not double."""
    B, A, G, D = slot_out.shape
    live = jnp.arange(A, dtype=jnp.int32)[None, :] < jnp.reshape(n_active, (B, 1))
    tgt = jnp.where(live, jnp.clip(groups, 0, Hkv - 1), Hkv)
    b_idx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, A))
    out = jnp.zeros((B, Hkv, G, D), out_dtype)
    out = out.at[b_idx, tgt].set(slot_out.astype(out_dtype), mode="drop")
    return out.reshape(B, Hkv * G, D)
