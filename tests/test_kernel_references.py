"""The XLA references of the selective kernels (and their shared pieces: activations, slot scatter) against
the float64 NumPy references alone, in float32, without Pallas: fast enough to run once per mutant in
mutation testing (tests/mutation/run.py), and the definition the kernels are held to."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import activations as acts
from pallas_kernels import selective_attention_xla as axla
from pallas_kernels import selective_gemm_xla as gxla
from pallas_kernels.slots import scatter_slots
from tests import kernel_reference as npref

TOL = dict(rtol=2e-5, atol=2e-5)


def _f32(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh", "silu", None])
def test_activations_match_their_definitions(name):
    x = np.linspace(-7, 7, 2001)
    got = np.asarray(acts.get_activation(name)(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, npref.ACTS[name](x), rtol=1e-5, atol=2e-6)


def test_erf_approximation_and_unknown_activation():
    x = np.linspace(-5, 5, 4001)
    got = np.asarray(acts._erf(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, [math.erf(v) for v in x], rtol=0, atol=5e-7)
    assert set(acts.ACTIVATIONS) == {"relu", "gelu", "gelu_tanh", "silu", None}
    with pytest.raises(ValueError, match="activation must be one of"):
        acts.get_activation("tanh")


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", None])
@pytest.mark.parametrize("use_bias", [False, True])
def test_gather_up_and_dense_fallback(act, use_bias):
    rng = npref.seeded_rng()
    M, K, N, A = 3, 24, 40, 12
    x, w = _f32(rng, (M, K)), _f32(rng, (N, K), K**-0.5)
    bias = _f32(rng, (N,)) if use_bias else None
    idx = jnp.asarray(rng.integers(0, N, A), jnp.int32).at[A - 1].set(N + 5)  # duplicates; junk in the last slot
    for n in (0, 1, 5, A - 1):
        want = npref.gather_up_ref(x, w, idx, n, bias, act)
        for f in (gxla.gather_up_xla, gxla.dense_up_then_take):
            got = np.asarray(f(x, w, idx, jnp.int32(n), bias, act))
            assert got.shape == (M, A) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, **TOL, err_msg=f"{f.__name__} n={n}")
            assert not got[:, n:].any()


def test_gated_up_and_dense_fallback():
    rng = npref.seeded_rng()
    M, K, N, A = 2, 16, 30, 10
    x, wg, wu = _f32(rng, (M, K)), _f32(rng, (N, K), 0.3), _f32(rng, (N, K), 0.3)
    idx = jnp.asarray(rng.permutation(N)[:A], jnp.int32).at[A - 1].set(-4)
    for n in (0, 3, A - 1):
        want = npref.gather_up_gated_ref(x, wg, wu, idx, n)
        for f in (gxla.gather_up_gated_xla, gxla.dense_gated_then_take):
            got = np.asarray(f(x, wg, wu, idx, jnp.int32(n)))
            np.testing.assert_allclose(got, want, **TOL, err_msg=f"{f.__name__} n={n}")
            assert not got[:, n:].any()


@pytest.mark.parametrize("use_bias", [False, True])
def test_gather_down_and_dense_fallback(use_bias):
    rng = npref.seeded_rng()
    M, N, D, A = 3, 20, 16, 9
    h, w = _f32(rng, (M, A)), _f32(rng, (N, D), 0.4)
    bias = _f32(rng, (D,)) if use_bias else None
    idx = jnp.asarray(rng.integers(0, N, A), jnp.int32).at[2].set(idx_dup := 5).at[3].set(idx_dup)
    idx = idx.at[A - 1].set(N + 3)  # junk past n_active
    for n in (0, 1, 4, A - 1):
        want = npref.gather_down_ref(h, w, idx, n, bias)
        for f in (gxla.gather_down_xla, gxla.dense_scatter_down):
            got = np.asarray(f(h, w, idx, jnp.int32(n), bias))
            assert got.shape == (M, D) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, **TOL, err_msg=f"{f.__name__} n={n}")


def test_out_of_range_active_indices_are_clamped():
    rng = npref.seeded_rng()
    x, w, h = _f32(rng, (2, 8)), _f32(rng, (6, 8)), _f32(rng, (2, 3))
    idx, clamped = jnp.asarray([-2, 3, 9], jnp.int32), np.array([0, 3, 5])
    np.testing.assert_allclose(gxla.gather_up_xla(x, w, idx, 3, None, None),
                               npref.gather_up_ref(x, w, clamped, 3, None, None), **TOL)
    np.testing.assert_allclose(gxla.gather_down_xla(h, w, idx, 3), npref.gather_down_ref(h, w, clamped, 3), **TOL)
    np.testing.assert_allclose(gxla.dense_scatter_down(h, w, idx, 3), npref.gather_down_ref(h, w, clamped, 3), **TOL)


def test_out_of_range_active_groups_are_clamped():
    """Like the GEMMs' indices: a traced group id outside [0, Hkv) in a live slot reads and writes the
    nearest valid group (the slot bookkeeping clamps its target the same way)."""
    rng = npref.seeded_rng()
    B, S, Hq, Hkv, D = 2, 7, 6, 3, 4
    q, k, v = _f32(rng, (B, Hq, D)), _f32(rng, (B, S, Hkv, D)), _f32(rng, (B, S, Hkv, D))
    lengths, n_active = jnp.asarray([5, 7], jnp.int32), jnp.asarray([2, 2], jnp.int32)
    groups, clamped = jnp.asarray([[Hkv + 4, 0], [-3, 1]], jnp.int32), np.array([[Hkv - 1, 0], [0, 1]])
    got = np.asarray(jax.jit(axla.select_decode_xla, static_argnums=(6,))(q, k, v, lengths, groups, n_active, 0.5))
    np.testing.assert_allclose(got, npref.select_decode_ref(q, k, v, lengths, clamped, n_active, sm_scale=0.5), **TOL)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2)])
def test_select_and_dense_decode_references(window, Hq, Hkv):
    rng = npref.seeded_rng()
    B, S, D, A = 4, 19, 8, 3
    q, k, v = _f32(rng, (B, Hq, D)), _f32(rng, (B, S, Hkv, D)), _f32(rng, (B, S, Hkv, D))
    lengths = jnp.asarray([0, 1, 11, S], jnp.int32)
    groups = jnp.asarray(rng.integers(0, Hkv, (B, A)), jnp.int32).at[0, 0].set(Hkv - 1).at[1, A - 1].set(Hkv + 7)
    n_active = jnp.asarray([1, A - 1, A, 2], jnp.int32)
    scale = 0.37
    got = np.asarray(axla.select_decode_xla(q, k, v, lengths, groups, n_active, scale, window))
    want = npref.select_decode_ref(q, k, v, lengths, groups, n_active, sm_scale=scale, window=window)
    assert got.shape == (B, Hq, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, **TOL)
    assert not got[0].any()  # length 0: zeros
    every = jnp.tile(jnp.arange(Hkv, dtype=jnp.int32), (B, 1))
    dense = np.asarray(axla.dense_decode_xla(q, k, v, lengths, scale, window))
    np.testing.assert_allclose(dense, npref.select_decode_ref(q, k, v, lengths, every, jnp.full((B,), Hkv),
                                                              sm_scale=scale, window=window), **TOL)


def test_key_mask_lengths_and_window():
    ok = np.asarray(axla._key_mask(jnp.asarray([0, 3, 9, 12]), 9, None))
    np.testing.assert_array_equal(ok.sum(1), [0, 3, 9, 9])  # lengths past S are clipped
    ok = np.asarray(axla._key_mask(jnp.asarray([0, 3, 7]), 9, 4))
    np.testing.assert_array_equal(ok.astype(int), [[0] * 9, [1, 1, 1] + [0] * 6, [0, 0, 0, 1, 1, 1, 1, 0, 0]])


def test_scatter_slots_places_groups_and_drops_inactive_slots():
    B, A, G, D, Hkv = 2, 3, 2, 4, 4
    rng = npref.seeded_rng()
    slot_out = rng.standard_normal((B, A, G, D)).astype(np.float32)
    slot_out[0, 2] = slot_out[0, 0]  # a group listed twice carries the same values in both slots
    groups = jnp.asarray([[2, 0, 2], [9, 1, -1]], jnp.int32)  # a duplicate; out-of-range ids
    n_active = jnp.asarray([3, 2], jnp.int32)
    out = np.asarray(scatter_slots(jnp.asarray(slot_out), groups, n_active, Hkv, jnp.float32)).reshape(B, Hkv, G, D)
    want = np.zeros((B, Hkv, G, D), np.float32)
    want[0, 0], want[0, 2] = slot_out[0, 1], slot_out[0, 0]  # set, not added: the duplicate counts once
    want[1, 3], want[1, 1] = slot_out[1, 0], slot_out[1, 1]  # 9 clamps to the last group; -1 is inactive
    np.testing.assert_array_equal(out, want)
    jit = jax.jit(scatter_slots, static_argnums=(3, 4))(jnp.asarray(slot_out), groups, n_active, Hkv, jnp.float16)
    assert jit.dtype == jnp.float16 and jit.shape == (B, Hkv * G, D)
