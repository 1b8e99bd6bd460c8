"""One layer function for every mode, a cache that owns its writes, live rows (issue 12)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_cached
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill, split_model
from polar_jax.routers import router_selector
from test_routers_bundle import random_bundle


def _tokens(model, b, t, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(3, model.config.vocab_size, (b, t)), jnp.int32)


def _np_cache(cache):
    return [np.asarray(x) for x in cache.k + cache.v]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_prefill_then_decode_equals_full_forward(name):
    model, _ = load_cached(name)
    toks = _tokens(model, 2, 11, seed=1)
    graphdef, state = split_model(model)
    cache = KVCache.create(model.config, 2, 32, model.dtype)
    logits, cache = prefill(graphdef, state, toks[:, :8], jnp.full((2,), 8, jnp.int32), cache)
    full = model(toks)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, 7]), atol=2e-4, rtol=0)
    for i in range(8, 11):
        logits, cache = decode_step(graphdef, state, cache, toks[:, i], None, "xla", "xla")
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, i]), atol=2e-4, rtol=0)
    assert np.asarray(cache.lengths).tolist() == [11, 11]


def test_prefill_into_one_slot_leaves_other_rows_bit_identical():
    model, _ = load_cached("tiny-llama")
    graphdef, state = split_model(model)
    toks = _tokens(model, 3, 6, seed=2)
    cache = KVCache.create(model.config, 3, 16, model.dtype)
    _, cache = prefill(graphdef, state, toks, jnp.full((3,), 6, jnp.int32), cache)
    before = _np_cache(cache)
    new = _tokens(model, 1, 4, seed=3)
    _, cache = model.prefill(new, jnp.asarray([4], jnp.int32), cache, rows=jnp.asarray([1], jnp.int32))
    after = _np_cache(cache)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]])  # the other slots: bit for bit
        assert not np.array_equal(a[1, :4], b[1, :4])
    assert np.asarray(cache.lengths).tolist() == [6, 4, 6]
    # the new slot decodes exactly like that prompt alone
    logits, _ = decode_step(graphdef, state, cache, jnp.asarray([5, 9, 7], jnp.int32), None, "xla", "xla")
    alone = KVCache.create(model.config, 1, 16, model.dtype)
    _, alone = prefill(graphdef, state, new, jnp.asarray([4], jnp.int32), alone)
    want, _ = decode_step(graphdef, state, alone, jnp.asarray([9], jnp.int32), None, "xla", "xla")
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(want[0]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_dead_row_changes_neither_the_union_nor_the_other_rows(impl):
    """A row that is not live is not written, reads no KV and does not count in the MLP union: the other
    rows' logits equal those of a batch without it (the MLP union included)."""
    model, _ = load_cached("polar-tiny-opt")
    graphdef, state = split_model(model)
    sel = router_selector(random_bundle(model, seed=4), attn_density=0.5, mlp_recall=0.99)
    toks = _tokens(model, 3, 7, seed=5)
    cache = KVCache.create(model.config, 3, 16, model.dtype)
    _, cache = prefill(graphdef, state, toks[:, :6], jnp.full((3,), 6, jnp.int32), cache)
    cache = cache.with_live(jnp.asarray([True, False, True]))
    before = _np_cache(cache)
    keep = jax.tree.map(jnp.copy, cache)  # decode_step donates its cache
    logits, out = decode_step(graphdef, state, cache, toks[:, 6], sel, impl, impl)
    after = _np_cache(out)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a[1], b[1])  # the dead row is not written
    assert np.asarray(out.lengths).tolist() == [7, 6, 7]
    pair = KVCache.create(model.config, 2, 16, model.dtype)
    _, pair = prefill(graphdef, state, toks[jnp.asarray([0, 2]), :6], jnp.full((2,), 6, jnp.int32), pair)
    want, _ = decode_step(graphdef, state, pair, toks[jnp.asarray([0, 2]), 6], sel, impl, impl)
    np.testing.assert_allclose(np.asarray(logits[jnp.asarray([0, 2])]), np.asarray(want), atol=5e-5, rtol=0)
    # with the third row live, the union (and so rows 0 and 2) differs: the test can see the union
    live_all, _ = decode_step(graphdef, state, keep.with_live(jnp.ones(3, bool)), toks[:, 6], sel, impl, impl)
    assert float(jnp.max(jnp.abs(live_all[jnp.asarray([0, 2])] - want))) > 1e-4


def test_live_rows_change_without_recompiling():
    model, _ = load_cached("polar-tiny-opt")
    graphdef, state = split_model(model)
    sel = router_selector(random_bundle(model, seed=6), attn_density=0.5, mlp_recall=0.99)
    cache = KVCache.create(model.config, 4, 16, model.dtype)
    _, cache = prefill(graphdef, state, _tokens(model, 4, 5, seed=7), jnp.full((4,), 5, jnp.int32), cache)
    tok = jnp.asarray([3, 4, 5, 6], jnp.int32)
    sizes = []
    for live in ([1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]):
        _, cache = decode_step(graphdef, state, cache.with_live(jnp.asarray(live, bool)), tok, sel, "xla", "xla")
        sizes.append(decode_step._cache_size())
    assert sizes[1:] == sizes[:1] * 3  # one executable serves every live-row pattern


def test_cache_insert_writes_only_the_given_slots():
    model, _ = load_cached("tiny-opt")
    graphdef, state = split_model(model)
    big = KVCache.create(model.config, 4, 16, model.dtype)
    _, big = prefill(graphdef, state, _tokens(model, 4, 5, seed=8), jnp.full((4,), 5, jnp.int32), big)
    small = KVCache.create(model.config, 2, 16, model.dtype)
    _, small = prefill(graphdef, state, _tokens(model, 2, 3, seed=9), jnp.full((2,), 3, jnp.int32), small)
    before = _np_cache(big)
    out = big.insert(jnp.asarray([3, 0]), small)
    for a, b, s in zip(before, _np_cache(out), _np_cache(small)):
        np.testing.assert_array_equal(b[[1, 2]], a[[1, 2]])
        np.testing.assert_array_equal(b[3], s[0])
        np.testing.assert_array_equal(b[0], s[1])
    assert np.asarray(out.lengths).tolist() == [3, 5, 5, 3]
    with pytest.raises(ValueError, match="cannot insert"):
        big.insert(jnp.asarray([0]), dataclasses.replace(small, k=small.k[:1], v=small.v[:1]))


def test_one_layer_function_for_every_mode(monkeypatch):
    """__call__, prefill and decode all run through Block.__call__ (no second copy of the layer)."""
    from polar_jax.models.base import Block

    model, _ = load_cached("tiny-llama")
    seen = []
    real = Block.__call__

    def spy(self, x, kv, step, layer):
        seen.append(step.mode)
        return real(self, x, kv, step, layer)

    monkeypatch.setattr(Block, "__call__", spy)
    toks = _tokens(model, 1, 4, seed=10)
    model(toks)
    cache = KVCache.create(model.config, 1, 8, model.dtype)
    _, cache = model.prefill(toks, jnp.asarray([4], jnp.int32), cache)
    model.decode(toks[:, 0], cache, attn_impl="xla", mlp_impl="xla")
    n = model.config.num_layers
    assert seen == ["full"] * n + ["prefill"] * n + ["decode"] * n
    jax.clear_caches()
