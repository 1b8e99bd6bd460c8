"""Dequantization of every supported GGUF tensor type against an independent decoding of ggml's block
layouts (written here from the format, block by block, in plain NumPy), on random blocks."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q

from convert.gguf_reader import SUPPORTED_TYPES, GGUFFile


def _f16(b: np.ndarray) -> float:
    return float(np.frombuffer(b.tobytes(), np.float16)[0])


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    """6-bit scale and min of sub-block j from the 12 packed bytes of a Q4_K/Q5_K block."""
    if j < 4:
        return int(q[j] & 63), int(q[j + 4] & 63)
    return int((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)), int((q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _block(t: Q, b: np.ndarray) -> np.ndarray:
    """One block's values."""
    if t == Q.Q8_0:
        return _f16(b[:2]) * b[2:].view(np.int8).astype(np.float64)
    if t in (Q.Q4_0, Q.Q4_1):
        d = _f16(b[:2])
        m, qs = (0.0, b[2:]) if t == Q.Q4_0 else (_f16(b[2:4]), b[4:])
        lo, hi = (qs & 0xF).astype(np.float64), (qs >> 4).astype(np.float64)
        off = 8.0 if t == Q.Q4_0 else 0.0
        return np.concatenate([d * (lo - off) + m, d * (hi - off) + m])
    if t in (Q.Q5_0, Q.Q5_1):
        d = _f16(b[:2])
        m, rest = (0.0, b[2:]) if t == Q.Q5_0 else (_f16(b[2:4]), b[4:])
        qh, qs = int.from_bytes(rest[:4].tobytes(), "little"), rest[4:]
        out = np.zeros(32)
        for j in range(16):
            x0 = int(qs[j] & 0xF) | (((qh >> j) & 1) << 4)
            x1 = int(qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
            off = 16 if t == Q.Q5_0 else 0
            out[j], out[j + 16] = d * (x0 - off) + m, d * (x1 - off) + m
        return out
    if t in (Q.Q4_K, Q.Q5_K):
        d, dmin, sc = _f16(b[:2]), _f16(b[2:4]), b[4:16]
        qh, qs = (None, b[16:]) if t == Q.Q4_K else (b[16:48], b[48:])
        out = []
        for chunk in range(4):  # 64 values: low nibbles with sub-block 2c, high nibbles with 2c+1
            q = qs[32 * chunk : 32 * chunk + 32]
            for half, nib in ((0, q & 0xF), (1, q >> 4)):
                s, mn = _scale_min_k4(2 * chunk + half, sc)
                v = nib.astype(np.float64)
                if qh is not None:
                    v = v + 16 * ((qh >> (2 * chunk + half)) & 1)
                out.append(d * s * v - dmin * mn)
        return np.concatenate(out)
    if t == Q.Q6_K:
        ql, qh, sc, d = b[:128], b[128:192], b[192:208].view(np.int8), _f16(b[208:210])
        out = np.zeros(256)
        for n in range(2):  # two halves of 128 values
            L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :]
            for j in range(32):
                q = [(L[j] & 0xF) | ((H[j] & 3) << 4), (L[j + 32] & 0xF) | (((H[j] >> 2) & 3) << 4),
                     (L[j] >> 4) | (((H[j] >> 4) & 3) << 4), (L[j + 32] >> 4) | (((H[j] >> 6) & 3) << 4)]
                for r in range(4):
                    out[128 * n + 32 * r + j] = d * S[j // 16 + 2 * r] * (int(q[r]) - 32)
        return out
    raise AssertionError(t)


def reference_dequant(t: Q, raw: np.ndarray, cols: int) -> np.ndarray:
    if t == Q.F32:
        return raw.view(np.float32).astype(np.float64)
    if t == Q.F16:
        return raw.view(np.float16).astype(np.float64)
    if t == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    block, size = GGML_QUANT_SIZES[t]
    rows = raw.reshape(raw.shape[0], cols // block, size)
    return np.stack([np.concatenate([_block(t, blk) for blk in row]) for row in rows])


def _random_raw(t: Q, rows: int, cols: int, rng) -> np.ndarray:
    if t == Q.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32)
    if t == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16)
    if t == Q.BF16:
        return (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    block, size = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    # Scale fields as fp16 of sane size (random bytes could be inf/nan): where each type keeps them.
    fields = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
              Q.Q6_K: [208]}[t]
    for off in fields:
        raw[..., off : off + 2] = np.frombuffer(rng.uniform(1e-3, 2e-2, raw.shape[:2]).astype(np.float16).tobytes(),
                                                np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_dequantization_matches_block_layout(tmp_path, type_name):
    t = Q[type_name]
    rows, cols = 3, 512
    raw = _random_raw(t, rows, cols, np.random.default_rng(int(t)))
    w = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    if t in (Q.F32, Q.F16):
        w.add_tensor("x", raw)
    else:
        w.add_tensor("x", raw.view(np.uint8), raw_shape=raw.view(np.uint8).shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "t.gguf")
    assert f.tensor_type("x") == type_name and f.shape("x") == (rows, cols)
    got = f.tensor("x")
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    want = reference_dequant(t, raw.view(np.uint8) if t not in (Q.F32, Q.F16, Q.BF16) else raw, cols)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    f.close()
