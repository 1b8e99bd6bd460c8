"""Implementation resolution for the kernels: which path runs ("xla" or "pallas") and how.

`auto` picks the Pallas Triton kernels only on CUDA GPUs of compute capability >= 8.0 (the
Triton backend needs Ampere or newer); everywhere else the XLA reference runs. An explicit
`pallas` request on a machine without such a GPU runs the kernel in interpret mode, which is
how the CPU test suite exercises the kernel bodies.
"""
from __future__ import annotations

import functools
from typing import Literal

import jax

Impl = Literal["auto", "xla", "pallas"]
_VALID = ("auto", "xla", "pallas")


@functools.lru_cache(maxsize=None)
def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of the default backend's first GPU, or None when it is not CUDA."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    if dev.platform != "gpu":
        return None
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return None
    try:
        major, minor = (int(p) for p in str(cc).split(".")[:2])
    except ValueError:
        return None
    return major, minor


def triton_gpu_available() -> bool:
    """True when the Pallas Triton kernels can run natively (CUDA, cc >= 8.0)."""
    cc = cuda_capability()
    return cc is not None and cc >= (8, 0)


def resolve_impl(impl: str) -> str:
    """Map a user `impl` argument to "xla" or "pallas" (errors on unknown values)."""
    if impl not in _VALID:
        raise ValueError(f"impl must be one of {_VALID}, got {impl!r}")
    if impl == "auto":
        return "pallas" if triton_gpu_available() else "xla"
    return impl


def use_interpret() -> bool:
    """Pallas kernels run in interpret mode when no suitable GPU is present."""
    return not triton_gpu_available()

