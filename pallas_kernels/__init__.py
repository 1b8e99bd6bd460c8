"""Pallas (Triton backend) kernels for Polar Sparsity, each beside an XLA reference.

- gather_up / gather_up_gated / gather_down: selective GEMMs over neuron-major MLP weights.
- select_decode: head/group-selective flash decoding over the [B, S, Hkv, D] KV cache.
- mlp_prefers_dense: the measured dense-vs-selective crossover used by impl="auto".
"""
from .crossover import density_threshold, load_crossover, mlp_prefers_dense
from .dispatch import resolve_impl, triton_gpu_available
from .selective_attention import select_decode
from .selective_gemm import gather_down, gather_up, gather_up_gated

__all__ = [
    "gather_up", "gather_up_gated", "gather_down", "select_decode", "mlp_prefers_dense",
    "density_threshold", "load_crossover", "resolve_impl", "triton_gpu_available",
]
