"""The MLP selection in attention's launches (router_selector(overlap=True) -> UnionRequest ->
pallas_kernels.select_decode_union): the same neurons, the same tokens, and the fused op really used."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
from conftest import bundle_for_rows, load_cached
from polar_jax.bench.launches import pallas_launches
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill, split_model
from polar_jax.models import base
from polar_jax.routers import router_selector, sparsify
from polar_jax.sparse_decode import sparse_selector

PROMPTS = {1: [[5, 17, 23, 42, 9]], 3: [[5, 17, 23, 42, 9], [7, 7, 31, 2, 11], [3, 1, 4, 1, 5]]}


@pytest.fixture(scope="module")
def opt_default():
    model, _ = load_cached("polar-tiny-opt")
    return model, polar_jax.load_sparsity("default", model)


def _counting(monkeypatch):
    """Counts the fused op's calls from the step, and the selector's `mlp` calls."""
    calls = {"fused": 0, "mlp": 0}
    fused, mlp = base.select_decode_union, sparsify.RouterSelector.mlp

    def count_fused(*a, **k):
        calls["fused"] += 1
        return fused(*a, **k)

    def count_mlp(self, *a, **k):
        out = mlp(self, *a, **k)
        calls["mlp"] += out is not None
        return out

    monkeypatch.setattr(base, "select_decode_union", count_fused)
    monkeypatch.setattr(sparsify.RouterSelector, "mlp", count_mlp)
    return calls


def _step_logits(model, selector, batch, impl):
    """Logits of one sparse decode step after a dense prefill of PROMPTS[batch]."""
    graphdef, state = split_model(model)
    prompts = PROMPTS[batch]
    cache = KVCache.create(model.config, batch, 16, model.dtype)
    tokens = jnp.asarray([p[:-1] for p in prompts], jnp.int32)
    _, cache = prefill(graphdef, state, tokens, jnp.full((batch,), tokens.shape[1], jnp.int32), cache)
    logits, _ = decode_step(graphdef, state, cache, jnp.asarray([p[-1] for p in prompts], jnp.int32), selector, impl,
                            impl)
    return np.asarray(logits)


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("batch", [1, 3])
def test_overlapped_selection_computes_the_step_of_the_selection_apart(opt_default, impl, batch, monkeypatch):
    """Heads + MLP with the MLP selection run in attention's launches: the logits of the step that selects apart
    (to the bit), every sparse-MLP layer through the fused op and none through the selector's own `mlp` (at one
    sequence with the routers' shared product, whose MLP columns the fused op reads at an offset)."""
    model, bundle = opt_default
    apart = router_selector(bundle, 0.5, 0.99, select_impl=impl, fuse_routers=batch == 1)
    overlap = router_selector(bundle, 0.5, 0.99, select_impl=impl, fuse_routers=batch == 1, overlap=True)
    assert overlap.overlap and not apart.overlap and overlap.fused_first == (batch == 1)
    sparse_layers = [i for i in range(model.config.num_layers) if overlap._mlp_on(i, batch)]
    assert sparse_layers, "the default bundle runs a sparse MLP at this batch size"
    want = _step_logits(model, apart, batch, impl)
    heads_only = _step_logits(model, router_selector(bundle, 0.5, 0.99, mlp=False, select_impl=impl), batch, impl)
    assert np.abs(want - heads_only).max() > 1e-4  # the MLP selection changes the logits
    jax.clear_caches()  # the counts below are of tracing: a cached step would trace nothing
    calls = _counting(monkeypatch)
    got = _step_logits(model, overlap, batch, impl)
    np.testing.assert_array_equal(got, want)
    assert calls["fused"] == len(sparse_layers) and calls["mlp"] == 0


def test_generate_with_the_overlapped_selection_keeps_its_tokens(opt_default):
    """Through `generate` (dense prefill, the on-device token loop): the tokens of the selection apart."""
    model, bundle = opt_default
    run = dict(attn_impl="triton", mlp_impl="triton", eos_token_id=())
    outs = [polar_jax.generate(model, PROMPTS[3], 6, selector=router_selector(bundle, 0.5, 0.99, select_impl="triton",
                                                                               overlap=overlap), **run)
            for overlap in (False, True)]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


def test_a_request_on_another_backend_than_attention_runs_apart(opt_default, monkeypatch):
    """Router selection through XLA while attention runs the Pallas kernel: no shared launch (the op has one
    backend for both), the same tokens."""
    model, bundle = opt_default
    run = dict(attn_impl="triton", mlp_impl="triton", eos_token_id=())
    want = polar_jax.generate(model, PROMPTS[3], 4, selector=router_selector(bundle, 0.5, 0.99, select_impl="xla"),
                              **run)
    jax.clear_caches()
    calls = _counting(monkeypatch)
    got = polar_jax.generate(model, PROMPTS[3], 4,
                             selector=router_selector(bundle, 0.5, 0.99, select_impl="xla", overlap=True), **run)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert calls["fused"] == 0 and calls["mlp"] == 0


def test_union_request_is_offered_only_for_a_sparse_threshold_mlp_with_overlap(opt_default):
    """None with overlap off, with the paper's top-k rule, for a layer whose MLP is dense (layer 0) and for a
    heads-only selector; otherwise the request, whose result is the selector's own `mlp`."""
    model, bundle = opt_default
    d = model.config.hidden_size
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, d)), jnp.float32)
    live = jnp.asarray([True, False, True])
    on = router_selector(bundle, 0.5, 0.99, overlap=True)
    assert on.mlp_rule == "threshold"
    layer = next(i for i in range(model.config.num_layers) if on._mlp_on(i, 3))
    assert on.union_request(0, x, live) is None
    assert router_selector(bundle, 0.5, 0.99).union_request(layer, x, live) is None
    assert router_selector(bundle, 0.5, 0.99, mlp_rule="topk", overlap=True).union_request(layer, x, live) is None
    assert router_selector(bundle, 0.5, 0.99, mlp=False, overlap=True).union_request(layer, x, live) is None
    request, own = on.union_request(layer, x, live), on.mlp(layer, x, live)
    got = request.run()
    assert int(got.n_active) == int(own.n_active) > 0
    np.testing.assert_array_equal(np.asarray(got.idx), np.asarray(own.idx))


@pytest.mark.parametrize("switch", [False, True])
def test_sparse_selector_follows_the_module_switch(opt_default, switch, monkeypatch):
    monkeypatch.setattr(sparsify, "OVERLAP_MLP_SELECTION", switch)
    model, bundle = opt_default
    assert sparse_selector(model, bundle, batch=3, context=64, attn_density=0.5, policy="both").overlap == switch


def test_each_switch_takes_its_launches_out_of_the_step(opt_default):
    """What the two switches are for, counted in the step at 20 rows (every kernel through Pallas): with the
    overlap each sparse layer's attention and MLP selection are two launches instead of four; with the first
    product in the Q/K/V launch the product's own GEMV is gone; both together, both; the logits stay those of
    the step without them."""
    from polar_jax.bench.synthetic import random_cache

    model, _ = opt_default
    cfg, rows = model.config, 20
    rng = np.random.default_rng(4)
    bundle, _ = bundle_for_rows(cfg, rows, rng)
    graphdef, state = split_model(model)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, rows), jnp.int32)
    cache = random_cache(cfg, rows, 24, 12, model.dtype)

    def launches(**switches):
        selector = router_selector(bundle, 0.5, 0.99, select_impl="triton", fuse_routers=True, **switches)

        def step(state, cache, tokens, selector):
            return decode_step(graphdef, state, cache, tokens, selector, "triton", "triton", "triton")[0]

        logits = step(state, jax.tree.map(jnp.copy, cache), tokens, selector)
        return pallas_launches(step, state, cache, tokens, selector), np.asarray(logits), selector

    base, want, selector = launches()
    s = sum(selector._mlp_on(layer, rows) for layer in range(cfg.num_layers))  # the layers with a sparse MLP
    assert s and base["union_mask"] == base["union_compact"] == s
    # the routers' own GEMV: traced by both routers (XLA merges the two identical calls into one launch)
    assert base["gemv_nk_router"] in (s, 2 * s)
    overlap = {"union_mask": -s, "union_compact": -s, "select_decode": -s, "select_decode_finish": -s,
               "select_decode_mask": s, "select_decode_finish_compact": s}
    in_qkv = {"gemv_nk_router": -base["gemv_nk_router"], "gemv_multi": -s, "gemv_multi_router": s}
    for switches, changes in ((dict(overlap=True), overlap), (dict(first_in_qkv=True), in_qkv),
                              (dict(overlap=True, first_in_qkv=True), {**overlap, **in_qkv})):
        got, logits, _ = launches(**switches)
        want_counts = base.copy()
        want_counts.update(changes)  # Counter.update adds
        assert got == +want_counts, (switches, got, base)
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
