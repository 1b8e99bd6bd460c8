"""Selective GEMMs: Pallas kernels (interpret mode on CPU) vs the XLA reference vs float64 NumPy."""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
import pallas_kernels.triton as pktri
from pallas_kernels import selective_gemm_xla as xref
from pallas_kernels.crossover import density_threshold
from pallas_kernels.selective_gemm_triton import (DownConfig, UpConfig, choose_down_config,
                                                  choose_up_config)
from tests import kernel_reference as npref

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)

TOL = {jnp.bfloat16: 1.5e-2, jnp.float16: 3e-3, jnp.float32: 1e-4}


def _rng(request) -> np.random.Generator:
    return npref.seeded_rng()  # fixed per test id (printed; POLAR_TEST_SEED explores others)


def _arr(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _idx(rng, N, A, dup=False):
    if dup:
        return jnp.asarray(rng.integers(0, N, A), jnp.int32)
    return jnp.asarray(rng.permutation(N)[:A], jnp.int32)


def _check(out, ref, dtype):
    err = npref.rel_err(out, ref)
    assert err < TOL[dtype], err


# Shapes: (M, K, N, A); odd sizes exercise masking, A > 32 spans several blocks.
UP_CASES = [
    (1, 200, 96, 40, jnp.bfloat16, "relu", True),
    (5, 384, 130, 70, jnp.float16, "gelu", False),
    (20, 256, 64, 33, jnp.bfloat16, "silu", True),
    (3, 100, 50, 17, jnp.float32, None, False),
]


@pytest.mark.parametrize("M,K,N,A,dtype,act,use_bias", UP_CASES)
def test_gather_up_matches_references(request, M, K, N, A, dtype, act, use_bias):
    rng = _rng(request)
    x = _arr(rng, (M, K), dtype)
    w = _arr(rng, (N, K), dtype, K**-0.5)
    bias = _arr(rng, (N,), dtype) if use_bias else None
    idx = _idx(rng, N, A)
    f = jax.jit(lambda x, w, idx, n, b: pk.gather_up(x, w, idx, n, b, act, impl="triton"))
    for n in sorted({0, 1, A // 2 + 1, A}):  # one compiled kernel serves every count
        out = f(x, w, idx, jnp.int32(n), bias)
        assert out.shape == (M, A) and out.dtype == dtype
        ref = npref.gather_up_ref(x, w, idx, n, bias, act)
        _check(out, ref, dtype)
        _check(pk.gather_up(x, w, idx, n, bias, act, impl="xla"), ref, dtype)
        assert not np.asarray(out[:, n:]).any(), "columns >= n_active must be exactly 0"
    assert f._cache_size() == 1


@pytest.mark.parametrize("split_k", [1, 3])
def test_gather_up_duplicates_and_split_k(request, split_k):
    rng = _rng(request)
    M, K, N, A = 2, 3 * 128, 40, 24
    x = _arr(rng, (M, K), jnp.bfloat16)
    w = _arr(rng, (N, K), jnp.bfloat16, K**-0.5)
    idx = _idx(rng, N, A, dup=True).at[1].set(0).at[2].set(0)
    cfg = UpConfig(block_m=16, block_a=16, block_k=128, split_k=split_k, num_warps=4, num_stages=2)
    n = A - 3
    out = pktri.gather_up(x, w, idx, n, None, "relu", config=cfg)
    _check(out, npref.gather_up_ref(x, w, idx, n, None, "relu"), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out[:, 1]), np.asarray(out[:, 2]))
    assert not np.asarray(out[:, n:]).any()


@pytest.mark.parametrize("split_k,dtype", [(1, jnp.bfloat16), (2, jnp.float16)])
def test_gather_up_gated(request, split_k, dtype):
    rng = _rng(request)
    M, K, N, A = 3, 256, 72, 45
    x = _arr(rng, (M, K), dtype)
    wg, wu = _arr(rng, (N, K), dtype, K**-0.5), _arr(rng, (N, K), dtype, K**-0.5)
    idx = _idx(rng, N, A)
    cfg = dataclasses.replace(choose_up_config(M, K, A, gated=True), block_k=128, split_k=split_k)
    for n in (1, A):
        ref = npref.gather_up_gated_ref(x, wg, wu, idx, n)
        out = pktri.gather_up_gated(x, wg, wu, idx, n, config=cfg)
        _check(out, ref, dtype)
        _check(pk.gather_up_gated(x, wg, wu, idx, n, impl="xla"), ref, dtype)
        assert not np.asarray(out[:, n:]).any()


DOWN_CASES = [
    (1, 70, 200, 40, jnp.bfloat16, True, 1, False),
    (6, 33, 130, 50, jnp.float16, False, 2, False),
    (17, 96, 64, 64, jnp.bfloat16, True, 3, False),
    (2, 20, 48, 9, jnp.float32, False, 1, False),
    # splits summed with f32 atomics into a tile-padded buffer instead of partials
    (6, 33, 130, 50, jnp.float16, True, 2, True),
    (17, 96, 64, 64, jnp.bfloat16, False, 3, True),
]


@pytest.mark.parametrize("M,N,D,A,dtype,use_bias,split,atomic", DOWN_CASES)
def test_gather_down_matches_references(request, M, N, D, A, dtype, use_bias, split, atomic):
    rng = _rng(request)
    h = _arr(rng, (M, A), dtype)
    w = _arr(rng, (N, D), dtype, A**-0.5)
    bias = _arr(rng, (D,), dtype) if use_bias else None
    idx = _idx(rng, N, A, dup=True)  # duplicates are summed twice: that is the contract
    cfg = dataclasses.replace(choose_down_config(M, D, A), block_j=32, block_d=64, split_j=split,
                              atomic=atomic)
    f = jax.jit(lambda h, w, idx, n, b: pktri.gather_down(h, w, idx, n, b, config=cfg))
    for n in sorted({0, 1, A // 3 + 1, A}):
        ref = npref.gather_down_ref(h, w, idx, n, bias)
        out = f(h, w, idx, jnp.int32(n), bias)
        assert out.shape == (M, D) and out.dtype == dtype
        if n == 0 and bias is None:
            assert not np.asarray(out).any()
        else:
            _check(out, ref, dtype)
        _check(pk.gather_down(h, w, idx, n, bias, impl="xla"), ref, dtype)
    assert f._cache_size() == 1


def test_tiling_heuristics_stay_in_bounds():
    """Split counts: no K split once the (m, a) blocks cover the SMs, whole k-blocks otherwise;
    the down projection never has more splits than neuron chunks."""
    for M, K, A, gated in ((1, 4096, 4096, False), (64, 4096, 8192, False), (64, 4096, 2752, True),
                           (64, 4096, 1638, False), (16, 9216, 1843, False), (1, 1000, 7, False)):
        cfg = choose_up_config(M, K, A, gated)
        n_kb = -(-K // cfg.block_k)
        n_blocks = -(-M // cfg.block_m) * -(-A // cfg.block_a)
        assert n_kb % cfg.split_k == 0
        if n_blocks * (2 if gated else 1) >= 132 * 7 // 8:
            assert cfg.split_k == 1, (M, K, A, cfg)
        else:
            assert cfg.split_k > 1 or n_kb < 4, (M, K, A, cfg)
        d = choose_down_config(M, K, A)
        assert 1 <= d.split_j <= -(-A // d.block_j)
    # 16 < M <= 64: the down projection's programs fit one wave of two per SM; the up
    # projection switches to 64-row blocks once 32-row blocks would need a second wave.
    for D, A in ((4096, 8192), (9216, 9216), (4096, 1638), (9216, 1843)):
        d = choose_down_config(64, D, A)
        assert -(-D // d.block_d) * d.split_j <= 2 * 132, (D, A, d)
    assert choose_up_config(64, 9216, 9216).block_a == 64
    assert choose_up_config(64, 4096, 8192).block_a == 32
    assert choose_up_config(64, 4096, 8192, gated=True).block_a == 32


def test_dense_fallbacks_match_reference(request):
    rng = _rng(request)
    M, K, N, A, n = 4, 64, 48, 20, 13
    x = _arr(rng, (M, K), jnp.float32)
    w, wu = _arr(rng, (N, K), jnp.float32), _arr(rng, (N, K), jnp.float32)
    bias = _arr(rng, (N,), jnp.float32)
    idx = _idx(rng, N, A, dup=True)
    np.testing.assert_allclose(xref.dense_up_then_take(x, w, idx, n, bias, "gelu"),
                               npref.gather_up_ref(x, w, idx, n, bias, "gelu"), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xref.dense_gated_then_take(x, w, wu, idx, n),
                               npref.gather_up_gated_ref(x, w, wu, idx, n), rtol=1e-4, atol=1e-4)
    h = _arr(rng, (M, A), jnp.float32)
    wd = _arr(rng, (N, K), jnp.float32)
    np.testing.assert_allclose(xref.dense_scatter_down(h, wd, idx, n, None),
                               npref.gather_down_ref(h, wd, idx, n), rtol=1e-4, atol=1e-4)


def test_under_scan_with_traced_counts(request):
    rng = _rng(request)
    M, K, N, A, L = 2, 128, 64, 32, 3
    x = _arr(rng, (M, K), jnp.bfloat16)
    wu = _arr(rng, (L, N, K), jnp.bfloat16, K**-0.5)
    wd = _arr(rng, (L, N, K), jnp.bfloat16, N**-0.5)
    idx = jnp.stack([_idx(rng, N, A) for _ in range(L)])
    ns = jnp.asarray(rng.integers(1, A + 1, L), jnp.int32)

    def layer(impl):
        def step(h, p):
            w1, w2, i, n = p
            a = pk.gather_up(h, w1, i, n, None, "relu", impl=impl)
            return h + pk.gather_down(a, w2, i, n, None, impl=impl), None
        return jax.jit(lambda x: jax.lax.scan(step, x, (wu, wd, idx, ns))[0])

    got, want = layer("pallas")(x), layer("xla")(x)
    h = np.asarray(x, np.float64)
    for l in range(L):
        a = npref.gather_up_ref(h, wu[l], idx[l], ns[l], None, "relu")
        h = h + npref.gather_down_ref(a, wd[l], idx[l], ns[l])
    _check(got, h, jnp.bfloat16)
    _check(want, h, jnp.bfloat16)


def test_validation_errors():
    x = jnp.ones((2, 8), jnp.bfloat16)
    w = jnp.ones((10, 8), jnp.bfloat16)
    idx = jnp.arange(4, dtype=jnp.int32)
    rng = npref.seeded_rng()
    with pytest.raises(ValueError, match="K"):
        pk.gather_up(x, jnp.ones((10, 9), jnp.bfloat16), idx, 2)
    with pytest.raises(TypeError, match="dtype mismatch"):
        pk.gather_up(x, w.astype(jnp.float16), idx, 2)
    with pytest.raises(ValueError, match="n_active"):
        pk.gather_up(x, w, idx, 5)
    with pytest.raises(ValueError, match="out of range"):
        pk.gather_up(x, w, idx.at[1].set(10), 3)
    # Inactive slots may hold anything (here out of range): ignored, on random values, both paths.
    xr, wr = _arr(rng, (2, 8), jnp.float32), _arr(rng, (10, 8), jnp.float32)
    hr = _arr(rng, (2, 4), jnp.float32)
    for impl in ("xla", "triton"):
        up = pk.gather_up(xr, wr, idx.at[3].set(99), 3, None, "gelu", impl=impl)
        np.testing.assert_allclose(up, npref.gather_up_ref(xr, wr, idx, 3, None, "gelu"), rtol=1e-5, atol=1e-5)
        assert not np.asarray(up[:, 3]).any()
        down = pk.gather_down(hr, wr, idx.at[3].set(-7), 3, impl=impl)
        np.testing.assert_allclose(down, npref.gather_down_ref(hr, wr, idx, 3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        pk.gather_up(x, w, idx, 2, activation="tanh")
    with pytest.raises(ValueError, match="impl"):
        pk.gather_up(x, w, idx, 2, impl="cuda")
    with pytest.raises(TypeError, match="integer"):
        pk.gather_up(x, w, idx.astype(jnp.float32), 2)
    with pytest.raises(ValueError, match="A = len"):
        pk.gather_down(jnp.ones((2, 3), jnp.bfloat16), w, idx, 2)
    with pytest.raises(TypeError, match="bfloat16"):
        pk.gather_down(jnp.ones((2, 4), jnp.int32), jnp.ones((10, 8), jnp.int32), idx, 2)
    with pytest.raises(ValueError, match="gate and up"):
        pk.gather_up_gated(x, w, jnp.ones((11, 8), jnp.bfloat16), idx, 2)
    # Traced values are not checked and must not crash: an active out-of-range index reads the last row
    # (clamped), on both paths.
    bad, clamped = idx.at[3].set(1000), idx.at[3].set(9)
    for impl in ("xla", "triton"):
        got = jax.jit(lambda i, n: pk.gather_up(xr, wr, i, n, None, "relu", impl=impl))(bad, jnp.int32(4))
        np.testing.assert_allclose(got, npref.gather_up_ref(xr, wr, clamped, 4), rtol=1e-5, atol=1e-5)
        got = jax.jit(lambda i, n: pk.gather_down(hr, wr, i, n, impl=impl))(idx.at[0].set(-3), jnp.int32(4))
        np.testing.assert_allclose(got, npref.gather_down_ref(hr, wr, idx.at[0].set(0), 4), rtol=1e-5, atol=1e-5)


def test_crossover_decision():
    table = {1: 0.6, 16: 0.5, 64: 0.4, 256: 0.2}
    assert density_threshold(1, table) == 0.6
    assert density_threshold(8, table) == 0.5  # between buckets: the smaller (towards dense)
    assert density_threshold(1000, table) == 0.2
    thr = density_threshold(64)
    N = 1000
    assert pk.mlp_prefers_dense(64, int(thr * N) + 1, N) is True
    assert pk.mlp_prefers_dense(64, int(thr * N) - 1, N) is False
    traced = jax.jit(lambda n: pk.mlp_prefers_dense(64, n, N))(jnp.int32(N))
    assert bool(traced)


def test_auto_dispatch_dense_fallback(request, monkeypatch):
    """impl="auto" on a Triton-capable GPU: dense above the crossover density, kernel below,
    decided on the host for a concrete count and by lax.cond for a traced one (both exact)."""
    from pallas_kernels import backends as bk
    from pallas_kernels import selective_gemm as sg

    # "auto" resolves to the Triton backend, as on a GPU (the kernels still run in interpret mode)
    monkeypatch.setitem(bk.BACKENDS, "triton", dataclasses.replace(bk.BACKENDS["triton"], native=lambda: True))
    calls = {"dense": 0}
    real_dense = sg.ref.dense_up_then_take

    def counting_dense(*a, **k):
        calls["dense"] += 1
        return real_dense(*a, **k)

    monkeypatch.setattr(sg.ref, "dense_up_then_take", counting_dense)
    rng = _rng(request)
    M, K, N = 2, 128, 64
    A = N
    x = _arr(rng, (M, K), jnp.bfloat16)
    w = _arr(rng, (N, K), jnp.bfloat16, K**-0.5)
    wd = _arr(rng, (N, K), jnp.bfloat16, N**-0.5)
    idx = _idx(rng, N, A)
    thr = density_threshold(M)
    lo, hi = max(1, int(thr * N) - 2), N
    for n in (lo, hi):
        before = calls["dense"]
        out = pk.gather_up(x, w, idx, n, None, "relu")
        assert calls["dense"] - before == (1 if n > thr * N else 0)
        _check(out, npref.gather_up_ref(x, w, idx, n, None, "relu"), jnp.bfloat16)
        h = _arr(rng, (M, A), jnp.bfloat16)
        _check(pk.gather_down(h, wd, idx, n), npref.gather_down_ref(h, wd, idx, n), jnp.bfloat16)
    f = jax.jit(lambda x, w, i, n: pk.gather_up(x, w, i, n, None, "relu"))
    for n in (lo, hi):  # traced count: both branches compiled once, chosen at run time
        _check(f(x, w, idx, jnp.int32(n)), npref.gather_up_ref(x, w, idx, n, None, "relu"),
               jnp.bfloat16)
    assert f._cache_size() == 1
