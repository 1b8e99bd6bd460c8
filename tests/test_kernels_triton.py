"""The op contracts (tests/kernel_test_base.py) on the Pallas Triton backend (interpret mode on CPU)."""
import warnings

import jax.numpy as jnp
import pytest

from kernel_test_base import KernelOpTests

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)


class TestTritonFloat32(KernelOpTests):
    impl = "triton"
    dtype = jnp.float32


class TestTritonBfloat16(KernelOpTests):
    impl = "triton"
    dtype = jnp.bfloat16


@pytest.mark.parametrize("mask_first", [False, True])
def test_select_decode_union_shares_launches_and_matches_the_ops_apart(mask_first):
    """The shared launches give exactly the two ops' results (each program runs its own op's code), with the
    mask blocks after or before attention's programs, and attention split over several KV ranges (so the
    finish programs merge partials)."""
    import dataclasses

    import numpy as np

    from pallas_kernels import selective_attention_triton, union_select_triton
    from pallas_kernels.attention_union_triton import choose_overlap_config, select_decode_union

    rng = np.random.default_rng()
    B, Hq, Hkv, S, D, R, N, cap = 2, 4, 4, 600, 16, 32, 260, 100
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)))
    lengths = jnp.asarray([600, 333], jnp.int32)
    groups = jnp.asarray([[3, 1, 0, 2], [2, 0, 1, 3]], jnp.int32)
    n_active = jnp.asarray([2, 4], jnp.int32)  # the last program (row 1, slot 3, split 2) is live
    u = jnp.asarray(rng.standard_normal((B, R)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((R, N)) * R**-0.5, jnp.float32)
    live = jnp.asarray([True, True])
    cfg = choose_overlap_config(B, S, Hkv, D, Hq // Hkv, R, N)
    cfg = dataclasses.replace(cfg, attn=dataclasses.replace(cfg.attn, min_chunk=64), mask_first=mask_first)
    out, idx, count = select_decode_union(q, k, v, lengths, groups, n_active, u, w, live, jnp.float32(0.1), cap,
                                          config=cfg)
    want = selective_attention_triton.select_decode(q, k, v, lengths, groups, n_active, config=cfg.attn)
    want_idx, want_count = union_select_triton.union_select(u, w, live, jnp.float32(0.1), cap, config=cfg.select)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    assert int(count) == int(want_count) > 0
    assert cfg.attn.num_splits > 1


def test_select_decode_union_falls_back_to_the_ops_apart(monkeypatch):
    """Where the shared launch does not fit (no config), the entry point returns the two ops' own results."""
    import numpy as np

    from pallas_kernels import attention_union_triton, selective_attention_triton, union_select_triton

    monkeypatch.setattr(attention_union_triton, "choose_overlap_config", lambda *a, **k: None)
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 4, 16), (2, 50, 2, 16), (2, 50, 2, 16)))
    lengths, groups, n_active = jnp.asarray([50, 20]), jnp.asarray([[1, 0], [0, 1]]), jnp.asarray([1, 2])
    u = jnp.asarray(rng.standard_normal((2, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 90)), jnp.float32)
    live, t = jnp.asarray([True, True]), jnp.float32(1.0)
    out, idx, count = attention_union_triton.select_decode_union(q, k, v, lengths, groups, n_active, u, w, live, t, 40)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(
        selective_attention_triton.select_decode(q, k, v, lengths, groups, n_active)))
    want_idx, want_count = union_select_triton.union_select(u, w, live, t, 40)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    assert int(count) == int(want_count)
