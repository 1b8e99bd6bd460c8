"""select_decode: Pallas kernel (interpret mode on CPU) vs the XLA reference vs float64 NumPy."""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
import pallas_kernels.triton as pktri
from pallas_kernels.selective_attention_triton import (choose_attn_config, finish_block_d,
                                                       runtime_splits)
from pallas_kernels.selective_attention_xla import dense_decode_xla
from tests import kernel_reference as npref

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)

TOL = {jnp.bfloat16: 1.5e-2, jnp.float16: 3e-3, jnp.float32: 1e-4}


def _rng() -> np.random.Generator:
    return npref.seeded_rng()  # fixed per test id (printed; POLAR_TEST_SEED explores others)


def _inputs(rng, B, Hq, Hkv, S, D, A, dtype):
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), dtype)
    groups = jnp.asarray(np.stack([rng.permutation(max(Hkv, A))[:A] % Hkv for _ in range(B)]),
                         jnp.int32)
    return q, k, v, groups


def _check(out, ref, dtype):
    err = npref.rel_err(out, ref)
    assert err < TOL[dtype], err


def _zero_heads(out, groups, n_active, Hkv):
    """Heads of groups not selected in sequence b must be exactly zero."""
    B, Hq, _ = out.shape
    G = Hq // Hkv
    for b in range(B):
        sel = {int(g) for g in np.asarray(groups[b, : int(n_active[b])])}
        for g in set(range(Hkv)) - sel:
            assert not np.asarray(out[b, g * G:(g + 1) * G]).any()


# (B, Hq, Hkv, S, D, A, dtype, window, splits): GQA group sizes 1 (MHA), 4 and 8; odd S and D.
CASES = [
    (3, 4, 4, 150, 64, 2, jnp.bfloat16, None, 2),
    (2, 8, 2, 300, 128, 2, jnp.float16, None, 3),
    (2, 8, 1, 97, 96, 1, jnp.bfloat16, 40, 2),
    (3, 16, 2, 70, 32, 2, jnp.float32, None, 1),
    # many splits x 8 heads per group: the finish pass cuts the head dim into 16-wide blocks
    (2, 16, 2, 300, 96, 2, jnp.float16, None, 40),
]


@pytest.mark.parametrize("B,Hq,Hkv,S,D,A,dtype,window,splits", CASES)
def test_select_decode_matches_references(B, Hq, Hkv, S, D, A, dtype, window, splits):
    rng = _rng()
    q, k, v, groups = _inputs(rng, B, Hq, Hkv, S, D, A, dtype)
    # min_chunk 64 keeps several live splits at these small lengths.
    cfg = dataclasses.replace(choose_attn_config(B, S, A, D), num_splits=splits, min_chunk=64)
    if splits == 40:
        assert finish_block_d(splits, Hq // Hkv, D) == 16
    f = jax.jit(lambda *a: pktri.select_decode(*a, window=window, config=cfg))
    # Lengths 1, shorter than a tile, full capacity; counts none / one / all, varied per sequence.
    for lengths, n_active in (([1, S, 37][:B], [A, 1, 0][:B]), ([S, 63, 1][:B], [0, A, 1][:B]),
                              (list(rng.integers(1, S + 1, B)), [A] * B)):
        lengths = jnp.asarray(lengths, jnp.int32)
        n_active = jnp.asarray(n_active, jnp.int32)
        out = f(q, k, v, lengths, groups, n_active)
        assert out.shape == q.shape and out.dtype == dtype
        ref = npref.select_decode_ref(q, k, v, lengths, groups, n_active, window=window)
        _check(out, ref, dtype)
        xla = pk.select_decode(q, k, v, lengths, groups, n_active, window=window, impl="xla")
        _check(xla, ref, dtype)
        _zero_heads(out, groups, n_active, Hkv)
    assert f._cache_size() == 1


def test_duplicates_zero_length_scale_and_dense_equivalence():
    rng = _rng()
    B, Hq, Hkv, S, D = 3, 8, 4, 130, 64
    q, k, v, _ = _inputs(rng, B, Hq, Hkv, S, D, 4, jnp.bfloat16)
    lengths = jnp.asarray([0, 130, 65], jnp.int32)
    # Slot values past n_active are garbage (out of range) and must be ignored.
    groups = jnp.asarray([[1, 1, 77, -5], [2, 2, 0, 2], [3, 0, 1, 2]], jnp.int32)
    n_active = jnp.asarray([2, 3, 4], jnp.int32)
    cfg = dataclasses.replace(choose_attn_config(B, S, 4, D), num_splits=2, min_chunk=64)
    out = pktri.select_decode(q, k, v, lengths, groups, n_active, sm_scale=0.3, config=cfg)
    ref = npref.select_decode_ref(q, k, v, lengths, groups, n_active, sm_scale=0.3)
    _check(out, ref, jnp.bfloat16)
    assert not np.asarray(out[0]).any()  # length 0 gives zeros
    # Sequence 2 selects every group: equals dense decoding.
    dense = dense_decode_xla(q, k, v, lengths, 0.3)
    _check(out[2], np.asarray(dense[2], np.float64), jnp.bfloat16)
    _check(dense, npref.select_decode_ref(q, k, v, lengths, jnp.tile(jnp.arange(Hkv), (B, 1)),
                                          jnp.full((B,), Hkv), sm_scale=0.3), jnp.bfloat16)


def test_under_scan_with_traced_groups():
    rng = _rng()
    B, Hq, Hkv, S, D, A, Ly = 2, 8, 8, 64, 32, 3, 2
    q, _, _, groups = _inputs(rng, B, Hq, Hkv, S, D, A, jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((Ly, B, S, Hkv, D)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((Ly, B, S, Hkv, D)), jnp.bfloat16)
    lengths = jnp.asarray([5, 64], jnp.int32)
    n_active = jnp.asarray([3, 2], jnp.int32)

    def run(impl):
        def step(x, kv):
            return x + pk.select_decode(x, kv[0], kv[1], lengths, groups, n_active, impl=impl), None
        return jax.jit(lambda x: jax.lax.scan(step, x, (k, v))[0])(q)

    want = np.asarray(q, np.float64)
    for l in range(Ly):
        want = want + npref.select_decode_ref(want.astype(jnp.bfloat16), k[l], v[l], lengths,
                                              groups, n_active)
    _check(run("pallas"), want, jnp.bfloat16)
    _check(run("xla"), want, jnp.bfloat16)


def test_runtime_split_count():
    """Rounded up, but live slots within 10% of the target run unsplit (no partials)."""
    for total, cap, want in ((1024, 8, 1), (960, 8, 1), (900, 8, 2), (256, 8, 5), (64, 32, 17), (1, 64, 64),
                             (0, 4, 4), (5000, 8, 1)):
        assert int(runtime_splits(jnp.int32(total), cap, 1056)) == want, (total, cap, want)


def test_validation_errors():
    q = jnp.ones((2, 8, 16), jnp.bfloat16)
    k = jnp.ones((2, 32, 4, 16), jnp.bfloat16)
    L = jnp.asarray([3, 4], jnp.int32)
    g = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    n = jnp.asarray([2, 1], jnp.int32)
    with pytest.raises(ValueError, match="multiple"):
        pk.select_decode(jnp.ones((2, 6, 16), jnp.bfloat16), k, k, L, g, n)
    with pytest.raises(TypeError, match="dtype mismatch"):
        pk.select_decode(q, k.astype(jnp.float16), k, L, g, n)
    with pytest.raises(ValueError, match="n_active"):
        pk.select_decode(q, k, k, L, g, jnp.asarray([3, 1], jnp.int32))
    with pytest.raises(ValueError, match="out of range"):
        pk.select_decode(q, k, k, L, g.at[0, 1].set(4), n)
    # An inactive slot (row 1 uses one of its two) may hold an out-of-range group: ignored, on random
    # values and both paths.
    rng = _rng()
    qr, kr, vr, _ = _inputs(rng, 2, 8, 4, 32, 16, 2, jnp.float32)
    ref = npref.select_decode_ref(qr, kr, vr, L, g, n)
    for impl in ("xla", "triton"):
        out = pk.select_decode(qr, kr, vr, L, g.at[1, 1].set(4), n, impl=impl)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
        _zero_heads(out, g, n, 4)
    with pytest.raises(ValueError, match="lengths"):
        pk.select_decode(q, k, k, jnp.asarray([3, 33], jnp.int32), g, n)
    with pytest.raises(ValueError, match="k/v"):
        pk.select_decode(q, k[:, :, :, :8], k[:, :, :, :8], L, g, n)
    with pytest.raises(ValueError, match="window"):
        pk.select_decode(q, k, k, L, g, n, window=0)
    with pytest.raises(TypeError, match="integer"):
        pk.select_decode(q, k, k, L.astype(jnp.float32), g, n)
    # A traced out-of-range active group cannot be refused: never a crash, and every other head keeps its
    # value. The XLA path clamps it to the last group; the Pallas path computes the clamped group but its
    # finish pass (matching slots by the raw id) then zeroes that group's heads. The two differ only
    # there, so that group's heads are left unchecked on the Pallas path (reported in issue 13).
    want = npref.select_decode_ref(qr, kr, vr, L, g.at[0, 0].set(3), n)
    other = np.ones(want.shape[:2], bool)
    other[0, 6:8] = False  # heads of group 3 in row 0 (G = 2)
    for impl in ("xla", "triton"):
        got = np.asarray(jax.jit(lambda gg: pk.select_decode(qr, kr, vr, L, gg, n, impl=impl))(g.at[0, 0].set(99)))
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got[other], want[other], rtol=1e-4, atol=1e-5)
        if impl == "xla":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_one_sequence_gets_shorter_chunks():
    """B=1 decode: 128-key chunks (twice the splits of larger batches) measured faster on the H200."""
    one, two = choose_attn_config(1, 2120, 9, 128), choose_attn_config(2, 2120, 9, 128)
    assert (one.min_chunk, two.min_chunk) == (128, 256)
    assert one.num_splits == 17 and two.num_splits == 9


def test_the_triton_entry_point_of_the_shared_launch_validates_and_takes_a_config():
    """pallas_kernels.triton.select_decode_union: both ops' checks first; a config with the mask blocks first
    and a sliding window gives the references' results."""
    from pallas_kernels.attention_union_triton import choose_overlap_config

    rng = np.random.default_rng()
    B, Hq, Hkv, S, D, R, N = 2, 4, 2, 70, 16, 24, 90
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32) for _ in range(2))
    lengths, groups, n_active = jnp.asarray([70, 33]), jnp.asarray([[1, 0], [0, 1]]), jnp.asarray([1, 2])
    u, w = jnp.asarray(rng.standard_normal((B, R)), jnp.float32), jnp.asarray(rng.standard_normal((R, N)), jnp.float32)
    live, t = jnp.asarray([True, True]), jnp.float32(1.0)
    cfg = dataclasses.replace(choose_overlap_config(B, S, Hkv, D, Hq // Hkv, R, N), mask_first=True)
    out, idx, count = pktri.select_decode_union(q, k, v, lengths, groups, n_active, u, w, live, t, 40, window=20,
                                                config=cfg)
    want = pk.select_decode(q, k, v, lengths, groups, n_active, window=20, impl="xla")
    want_idx, want_count = pk.union_select(u, w, live, t, 40, impl="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    assert int(count) == int(want_count)
    with pytest.raises(ValueError, match="u_offset"):
        pktri.select_decode_union(q, k, v, lengths, groups, n_active, u, w, live, t, 40, u_offset=3)
    with pytest.raises(ValueError, match="n_active"):
        pktri.select_decode_union(q, k, v, lengths, groups, jnp.asarray([1, 3]), u, w, live, t, 40)
