"""The Triton backend's entry points with their tiling configs (for benchmarks and tuning).

Each takes the op's arguments plus an optional `config` (the backend's tiling dataclass); inputs are
validated by the op's public checks first, as `pallas_kernels.<op>(..., impl="triton")` would.
"""
from __future__ import annotations

from . import attention_union_triton as _attn_union
from . import selective_attention_triton as _attn
from . import selective_gemm_triton as _gemm
from . import union_select_triton as _sel
from .selective_attention import check_select_decode
from .selective_attention_triton import AttnConfig
from .selective_gemm import check_down, check_up
from .selective_gemm_triton import DownConfig, UpConfig
from .union_select import check_union_select
from .union_select_triton import SelectConfig
from .attention_union_triton import OverlapConfig

__all__ = ["gather_up", "gather_up_gated", "gather_down", "select_decode", "union_select", "select_decode_union",
           "UpConfig", "DownConfig", "AttnConfig", "SelectConfig", "OverlapConfig"]


def gather_up(x, w, idx, n_active, bias=None, activation="relu", config: UpConfig | None = None):
    check_up(x, {"w": w}, idx, n_active, bias, activation)
    return _gemm.gather_up(x, w, idx, n_active, bias, activation, config)


def gather_up_gated(x, w_gate, w_up, idx, n_active, config: UpConfig | None = None):
    check_up(x, {"w_gate": w_gate, "w_up": w_up}, idx, n_active, None)
    return _gemm.gather_up_gated(x, w_gate, w_up, idx, n_active, config)


def gather_down(h, w, idx, n_active, bias=None, config: DownConfig | None = None):
    check_down(h, w, idx, n_active, bias)
    return _gemm.gather_down(h, w, idx, n_active, bias, config)


def select_decode(q, k, v, lengths, groups, n_active, sm_scale=None, window=None, config: AttnConfig | None = None):
    check_select_decode(q, k, v, lengths, groups, n_active, window)
    return _attn.select_decode(q, k, v, lengths, groups, n_active, sm_scale, window, config)


def union_select(u, w, live, threshold, capacity: int, config: SelectConfig | None = None):
    check_union_select(u, w, live, threshold, capacity)
    return _sel.union_select(u, w, live, threshold, capacity, config=config)


def select_decode_union(q, k, v, lengths, groups, n_active, u, w, live, threshold, capacity: int, sm_scale=None,
                        window=None, u_offset: int = 0, clamp_count: bool = False, w_layout: str = "rn",
                        config: OverlapConfig | None = None):
    """select_decode and union_select in shared launches; `config` None: each op's own tiling (or the ops apart
    where both do not fit the device's shared memory)."""
    check_select_decode(q, k, v, lengths, groups, n_active, window)
    check_union_select(u, w, live, threshold, capacity, u_offset, w_layout)
    return _attn_union.select_decode_union(q, k, v, lengths, groups, n_active, u, w, live, threshold, capacity,
                                           sm_scale, window, u_offset, clamp_count, w_layout, config)
