"""Shared memory of a Triton tiling, and fitting a tiling to a device class's limit.

Triton stages the operands of `tl.dot` through shared memory and, to overlap loads with compute, keeps
`num_stages` copies of the tiles a loop streams: a kernel needs about
    num_stages x (bytes of the tiles loaded per loop step) + (tiles loaded once).
This is the estimate Triton's own matmul autotuner prunes configurations with. Checked against the H100
(benchmarks/results, tests/test_kernel_device_classes.py): it is exactly what the launches the H100 refused
requested (294 912 bytes, kernels_2026-11-21.json) and what Nsight Compute reported for gather_up at M=64
(98 304), and above what it reported for the other kernels (26-83 % of the estimate,
raw_2026-11-21_session3/ncu_before.csv): it errs on the safe side. The kernels run in 16-bit floats on
the GPU (2-byte items).

The CPU cross-lowering cannot see shared memory (the Triton IR is compiled for the actual GPU later), so
the dispatcher fits its tilings with this estimate and a test checks every tiling it picks per class.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

ITEM = 2  # bytes of a bfloat16 / float16 element: the kernels' GPU dtypes
MIN_STAGES = 2  # one stage would leave nothing in flight while the tile is used

C = TypeVar("C")


def staged_bytes(stages: int, per_stage_elems: int, once_elems: int = 0, itemsize: int = ITEM) -> int:
    """`stages` copies of the tiles streamed per loop step plus the tiles loaded once."""
    return (stages * per_stage_elems + once_elems) * itemsize


def fit_tiling(cfg: C, smem: Callable[[C], int], limit: int, step: str, min_step: int) -> C:
    """`cfg` (the H100 tiling) with the most pipeline stages that fit `limit` bytes: at most its own
    count and at least MIN_STAGES. When even that does not fit, the streamed loop step (field `step`:
    the k-step, the neuron chunk, the key block) is halved and the stages searched again, so the tile
    shape the tuning chose is kept where it fits and only the depth of the pipeline gives way first."""
    top = cfg.num_stages
    while True:
        for stages in range(top, min(MIN_STAGES, top) - 1, -1):
            cand = dataclasses.replace(cfg, num_stages=stages)
            if smem(cand) <= limit:
                return cand
        half = getattr(cfg, step) // 2
        if half < min_step:
            raise ValueError(f"no tiling of {cfg} fits {limit} bytes of shared memory")
        cfg = dataclasses.replace(cfg, **{step: half})
