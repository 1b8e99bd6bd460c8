"""Kernel backends: which implementations exist, where each runs natively, how `impl` resolves.

Every op (gather_up, gather_up_gated, gather_down, select_decode, union_select, select_decode_union, gemv, gemv_multi,
gemv_rows, unit_top_k, row_norm, kv_append) has one public function (validation + dispatch) and one implementation
per backend, registered here by name:
- "xla": the pure-XLA reference; runs on any JAX backend (CPU, GPU, TPU), float32 included.
- "triton": Pallas kernels lowered through Triton; native on CUDA GPUs of compute capability
  >= 8.0, and run in interpret mode elsewhere when asked for explicitly (that is how the CPU test
  suite exercises the kernel bodies). The Triton backend of Pallas is deprecated since jax 0.11.0.
A "mosaic_gpu" backend would register here with its own `native` rule.

`impl="auto"` takes the first backend of `AUTO_ORDER` that runs natively. "pallas" is the old name
of "triton", accepted with a DeprecationWarning for one release.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import jax


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


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    native: Callable[[], bool]  # runs natively on this host's default device
    where: str  # where it is supported, in words


BACKENDS: dict[str, Backend] = {
    "xla": Backend("xla", lambda: True, "any JAX backend (CPU, GPU, TPU); float32, bfloat16, float16"),
    "triton": Backend("triton", triton_gpu_available,
                      "CUDA GPUs with compute capability >= 8.0 (bfloat16/float16); interpret mode on "
                      "other hosts (float32 too), for tests"),
}
AUTO_ORDER = ("triton", "xla")
DEPRECATED = {"pallas": "triton"}
CHOICES = ("auto", *BACKENDS, *DEPRECATED)


def resolve_impl(impl: str) -> str:
    """A user `impl` ("auto", a backend name, or a deprecated alias) -> a backend name."""
    if impl in DEPRECATED:
        new = DEPRECATED[impl]
        warnings.warn(f"impl={impl!r} is deprecated: use impl={new!r}", DeprecationWarning, stacklevel=3)
        impl = new
    if impl == "auto":
        return next(name for name in AUTO_ORDER if BACKENDS[name].native())
    if impl not in BACKENDS:
        raise ValueError(f"impl must be one of {CHOICES}, got {impl!r}")
    return impl


def use_interpret() -> bool:
    """Pallas kernels run in interpret mode when no suitable GPU is present."""
    return not triton_gpu_available()


def dispatch(op: str, impls: dict[str, Callable], impl: str) -> Callable:
    """The implementation of `op` for a resolved backend name."""
    name = resolve_impl(impl)
    if name not in impls:
        raise ValueError(f"{op} has no {name!r} implementation (have {sorted(impls)})")
    return impls[name]
