"""GPU classes the Triton kernels are tiled for, and which one this host has.

The tilings were tuned on the H100. Other GPUs differ in two ways that matter to the kernels:
- shared memory per block: a Triton kernel keeps `num_stages` copies of its streamed operand tiles
  there, and a launch that asks for more than the GPU has fails (RESOURCE_EXHAUSTED), so the tiling
  must fit each class's limit (the `*_smem` estimates of each kernel module; tested per class);
- SM count: only sizes grids (how many splits fill the GPU); another count changes speed, never results.
The limits are the per-block opt-in maxima (CUDA's cudaDevAttrMaxSharedMemoryPerBlockOptin), which is
what Triton may allocate: H100 227 KB (the H100 reported "available: 232448" when a tiling asked for
more, benchmarks/results/kernels_2026-11-21.json), A100 163 KB, L4 (and every sm86/sm89 part) 99 KB.

A GPU of compute capability >= 8.0 that is not listed gets `GENERIC`: the smallest shared memory of any
such GPU, so whatever the dispatcher picks fits. Below 8.0 (e.g. the T4, 7.5) the Triton kernels do not
run natively (backends.py): `impl="auto"` takes the XLA path.
"""
from __future__ import annotations

import dataclasses

import jax

from . import backends

KB = 1024


@dataclasses.dataclass(frozen=True)
class DeviceClass:
    name: str  # key of the class (also in crossover.json)
    gpus: str  # in words
    num_sms: int  # sizes grids only
    smem_per_block: int  # bytes a block may use (opt-in maximum)
    device_kind: str  # a jax device_kind of the class: the abstract device the CPU tests lower for


SM90 = DeviceClass("sm90", "H100 / H200 (Hopper, compute capability 9.0)", 132, 227 * KB,
                   "NVIDIA H100 80GB HBM3")
SM80 = DeviceClass("sm80", "A100 (Ampere, compute capability 8.0)", 108, 163 * KB, "NVIDIA A100-SXM4-80GB")
SM89 = DeviceClass("sm89", "L4 (Ada, compute capability 8.9)", 58, 99 * KB, "NVIDIA L4")
# Unknown GPU: the smallest shared memory of the cc >= 8.0 parts (sm86 / sm89 / sm120: 99 KB) and an
# A100-like SM count (the device's own count is used when jax reports it).
GENERIC = DeviceClass("generic", "another CUDA GPU of compute capability >= 8.0", 108, 99 * KB,
                      "NVIDIA A10")

CLASSES: tuple[DeviceClass, ...] = (SM90, SM80, SM89, GENERIC)
BY_CAPABILITY: dict[tuple[int, int], DeviceClass] = {(9, 0): SM90, (8, 0): SM80, (8, 9): SM89}
# The class of the tuning: what the tilings are when no Triton-capable GPU is present (the kernels then
# run in interpret mode, where the tiling changes nothing but the tests' expectations).
REFERENCE = SM90


def class_for_capability(cc: tuple[int, int] | None) -> DeviceClass:
    """The class the dispatcher tiles for on a GPU of compute capability `cc` (None: no CUDA GPU)."""
    if cc is None or cc < (8, 0):
        return REFERENCE
    return BY_CAPABILITY.get(tuple(cc), GENERIC)


def current_device_class() -> DeviceClass:
    """The class of this host's default device (read at trace time by the choose_*_config functions)."""
    cls = class_for_capability(backends.cuda_capability())
    if cls is GENERIC:
        cores = getattr(jax.devices()[0], "core_count", None)
        if isinstance(cores, int) and cores > 0:
            cls = dataclasses.replace(cls, num_sms=cores)
    return cls


def class_named(name: str) -> DeviceClass:
    for cls in CLASSES:
        if cls.name == name:
            return cls
    raise ValueError(f"unknown device class {name!r}; known: {[c.name for c in CLASSES]}")


def class_of_device_kind(kind: str) -> DeviceClass | None:
    """The class of a jax device_kind string of a listed GPU (for results files, which record the kind),
    or None when the kind is not one of them."""
    k = kind.upper()
    if any(t in k for t in ("H100", "H200", "H800")):
        return SM90
    if any(t in k for t in ("A100", "A800")):
        return SM80
    if k.endswith(" L4") or k == "L4":
        return SM89
    return None
