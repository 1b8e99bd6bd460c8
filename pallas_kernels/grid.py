"""Grid-sizing arithmetic shared by the Triton kernels."""
from __future__ import annotations

NUM_SMS = 132  # H100/H200 SXM; only sizes grids (another count changes speed, never results)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(x: int, lo: int = 1) -> int:
    """Smallest power of two >= x (and >= lo): Triton tiles must have power-of-two sizes."""
    p = lo
    while p < x:
        p *= 2
    return p
