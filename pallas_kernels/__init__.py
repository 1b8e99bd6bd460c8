"""Polar Sparsity kernels, each op an API (validation + dispatch) over one implementation per backend.

- gather_up / gather_up_gated / gather_down: selective GEMMs over neuron-major MLP weights.
- select_decode: head/group-selective flash decoding over the [B, S, Hkv, D] KV cache.
- gemv: the dense decode projections at small batch (weight streams), either weight layout; gemv_f32: a
  narrow product left in float32 (the routers' first product).
- gemv_multi / gemv_rows: B=1 attention projections in one launch, over the selected heads only.
- union_select: fused MLP router selection (logits, threshold union over live rows, ascending ids).
- select_decode_union: select_decode and union_select in shared launches (the router's selection streams
  its matrix while attention runs).
- unit_top_k: each sequence's top-k attention units from its router's raw product, in one kernel.
- row_norm: LayerNorm / RMSNorm of the decode step's rows in one kernel (small batch); add_row_norm: the
  same after adding the previous projection's unfinished output (a SplitSum) to the residual stream.
- kv_append: the decode step's new K and V rows written into the caches in one kernel.
- mlp_prefers_dense: the measured dense-vs-selective crossover used by impl="auto" (per GPU class).
Backends (backends.py): "xla" (reference, anywhere) and "triton" (Pallas Triton on CUDA cc >= 8.0);
tilings per GPU class (devices.py: H100/H200, A100, L4, other), fitted to its shared memory (smem.py);
`pallas_kernels.triton` exposes the Triton entry points with their tiling configs (benchmarks).
"""
from .backends import BACKENDS, cuda_capability, resolve_impl, triton_gpu_available
from .crossover import density_threshold, load_crossover, mlp_prefers_dense, thresholds_for
from .devices import DeviceClass, current_device_class
from .dense_gemv import gemv, gemv_f32, prefers_gemv
from .unit_gemv import gemv_multi, gemv_rows
from .selective_attention import select_decode
from .selective_attention_xla import dense_decode_xla
from .selective_gemm import gather_down, gather_up, gather_up_gated
from .union_select import union_select
from .attention_union import select_decode_union
from .unit_top_k import unit_top_k
from .row_norm import add_row_norm, prefers_row_norm, row_norm
from .split_sum import SplitSum
from .kv_append import kv_append, prefers_kv_append

__all__ = [
    "gemv", "gemv_f32", "prefers_gemv", "gemv_multi", "gemv_rows", "gather_up", "gather_up_gated", "gather_down", "select_decode", "union_select", "select_decode_union", "unit_top_k", "row_norm", "add_row_norm", "SplitSum", "prefers_row_norm", "kv_append", "prefers_kv_append", "dense_decode_xla",
    "mlp_prefers_dense", "density_threshold", "load_crossover", "thresholds_for", "resolve_impl",
    "triton_gpu_available", "cuda_capability", "current_device_class", "DeviceClass", "BACKENDS",
]
