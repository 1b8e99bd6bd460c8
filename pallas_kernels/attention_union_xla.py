"""XLA reference of select_decode_union: the two ops' references one after the other."""
from __future__ import annotations

from .selective_attention_xla import select_decode_xla
from .union_select_xla import union_select_xla


def select_decode_union_xla(q, k, v, lengths, groups, n_active, u, w, live, threshold, capacity: int, sm_scale: float,
                            window=None, u_offset: int = 0, clamp: bool = False, w_layout: str = "rn"):
    out = select_decode_xla(q, k, v, lengths, groups, n_active, sm_scale, window)
    return (out, *union_select_xla(u, w, live, threshold, capacity, u_offset, clamp, w_layout))
