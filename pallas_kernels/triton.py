"""The Triton backend's entry points with their tiling configs (for benchmarks and tuning).

Each takes the op's arguments plus an optional `config` (the backend's tiling dataclass); inputs are
validated by the op's public checks first, as `pallas_kernels.<op>(..., impl="triton")` would.
"""
from __future__ import annotations

from . import selective_attention_triton as _attn
from . import selective_gemm_triton as _gemm
from . import union_select_triton as _sel
from .selective_attention import check_select_decode
from .selective_attention_triton import AttnConfig
from .selective_gemm import check_down, check_up
from .selective_gemm_triton import DownConfig, UpConfig
from .union_select import check_union_select
from .union_select_triton import SelectConfig

__all__ = ["gather_up", "gather_up_gated", "gather_down", "select_decode", "union_select",
           "UpConfig", "DownConfig", "AttnConfig", "SelectConfig"]


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
