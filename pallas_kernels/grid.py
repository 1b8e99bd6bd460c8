"""Grid-sizing arithmetic shared by the Triton kernels (SM counts per GPU class: devices.py)."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(x: int, lo: int = 1) -> int:
    """Smallest power of two >= x (and >= lo): Triton tiles must have power-of-two sizes."""
    p = lo
    while p < x:
        p *= 2
    return p
