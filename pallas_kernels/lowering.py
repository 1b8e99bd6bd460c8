"""Cross-lower a jitted function to CUDA on a host without a GPU.

Used by the test suite: the real Pallas -> Triton lowering runs against an abstract GPU (an H100 by
default; each device class of devices.py names its own device kind), so errors of the Triton backend
(non power-of-two shapes, unsupported primitives) show up in CPU CI for the tilings the dispatcher
picks for that class. The Triton IR Pallas emits does not depend on the GPU model (it reads a
compute capability only for float8 casts, which these kernels do not use); it is compiled for the
actual GPU later. Register or shared-memory exhaustion therefore only shows on a real GPU; the
shared-memory estimates (smem.py) and their per-class test stand in for the latter.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

H100_KIND = "NVIDIA H100 80GB HBM3"
TRITON_MARKER = "__gpu$xla.gpu.triton"


def _abstract_mesh(device_kind: str) -> Any:
    # jax 0.10.x and 0.11.x both expose these under jax.sharding; the constructors differ a
    # little between versions (keyword vs positional device fields, axis_types), so try both.
    AbstractDevice = jax.sharding.AbstractDevice
    AbstractMesh = jax.sharding.AbstractMesh
    try:
        dev = AbstractDevice(device_kind=device_kind, num_cores=1, platform="cuda")
    except TypeError:
        dev = AbstractDevice(device_kind, 1, "cuda")
    try:
        return AbstractMesh((1,), ("x",), abstract_device=dev)
    except TypeError:
        return AbstractMesh((("x", 1),), abstract_device=dev)  # older spelling


def lower_for_cuda(fn: Callable[..., Any], *args: Any, device_kind: str = H100_KIND) -> str:
    """Lower `fn` (not yet jitted) for CUDA with ShapeDtypeStruct args; returns the StableHLO text."""
    mesh = _abstract_mesh(device_kind)
    with jax.sharding.use_abstract_mesh(mesh):
        traced = jax.jit(fn).trace(*args)
        lowered = traced.lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def count_triton_calls(text: str) -> int:
    """Number of Triton custom calls in a lowered module's text."""
    return text.count(TRITON_MARKER)
