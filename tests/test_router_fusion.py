"""One product for both routers' first stage (router_selector(fuse_routers=True)), used at B=1 (XLA) and at
17-32 rows (the split-K GEMV, pallas_kernels.gemv_f32)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
from conftest import bundle_for_rows, load_cached
from pallas_kernels.dense_gemv import kernel_name
from polar_jax.bench.breakdown import part_of
from polar_jax.routers import router_selector
from polar_jax.routers import sparsify
from polar_jax.routers.sparsify import fuse_routers_for
from polar_jax.sparse_decode import sparse_selector


@pytest.fixture(scope="module")
def opt_default():
    model, _ = load_cached("polar-tiny-opt")
    return model, polar_jax.load_sparsity("default", model)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_fused_first_stage_selects_what_separate_routers_select(opt_default, impl):
    """One product for the head router and the MLP router's first matrix (fuse_routers) gives the same
    heads and neurons as the two products, and the same generated tokens."""
    model, bundle = opt_default
    ref = router_selector(bundle, 0.5, 0.99, select_impl=impl)
    fused = router_selector(bundle, 0.5, 0.99, select_impl=impl, fuse_routers=True)
    assert fused.fused_first and not ref.fused_first
    U = bundle.config.attn_units
    rng = np.random.default_rng(5)
    live = jnp.asarray([True, False, True])
    checked = 0
    for layer in range(bundle.config.num_layers):
        if ref.mlp_a[layer] is None or ref.attn_w[layer] is None:
            continue
        assert fused.mlp_a[layer].shape == (U + ref.mlp_a[layer].shape[0], model.config.hidden_size)
        x = jnp.asarray(rng.standard_normal((3, model.config.hidden_size)), jnp.float32)
        np.testing.assert_allclose(fused._attn_logits(layer, x), ref._attn_logits(layer, x), rtol=1e-5, atol=1e-5)
        a, b = ref.attention(layer, x, live), fused.attention(layer, x, live)
        np.testing.assert_array_equal(a.groups, b.groups)
        m, n = ref.mlp(layer, x, live), fused.mlp(layer, x, live)
        np.testing.assert_array_equal(np.asarray(m.idx)[: int(m.n_active)], np.asarray(n.idx)[: int(n.n_active)])
        checked += 1
    assert checked > 0
    prompts = [[5, 17, 23, 42, 9], [7, 7, 31, 2, 11]]
    outs = [polar_jax.generate(model, prompts, 6, selector=s, attn_impl=impl, mlp_impl=impl, eos_token_id=())
            for s in (ref, fused)]
    np.testing.assert_array_equal(outs[0], outs[1])
    # heads-only or MLP-only selectors have nothing to fuse
    assert not router_selector(bundle, 0.5, 0.99, mlp=False, fuse_routers=True).fused_first
    assert not router_selector(bundle, 0.5, 0.99, attn=False, fuse_routers=True).fused_first


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_fused_first_stage_at_20_rows_runs_the_split_k_gemv_and_selects_the_same(opt_default, impl, monkeypatch):
    """At 17-32 rows the fused product is `gemv_f32`'s (float32, split-K): the heads and the neuron union equal
    those of the two separate products. The default bundle runs a dense MLP at 20 rows, so the MLP tables here
    are calibrated for 20 rows on random router inputs (the decode benchmark's way)."""
    model, _ = opt_default
    cfg = model.config
    rows = 20
    rng = np.random.default_rng(9)
    bundle, inputs = bundle_for_rows(cfg, rows, rng)
    calls = []
    real = sparsify.gemv_f32
    monkeypatch.setattr(sparsify, "gemv_f32",
                        lambda *a, **k: calls.append((a[0].shape, k.get("label"))) or real(*a, **k))
    ref = router_selector(bundle, 0.5, 0.99, select_impl=impl)
    fused = router_selector(bundle, 0.5, 0.99, select_impl=impl, fuse_routers=True)
    live = jnp.asarray(np.arange(rows) != 3)
    checked = 0
    for layer in range(1, cfg.num_layers):
        x = jnp.asarray(inputs[layer], jnp.float32)
        np.testing.assert_allclose(fused._attn_logits(layer, x), ref._attn_logits(layer, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ref.attention(layer, x, live).groups, fused.attention(layer, x, live).groups)
        m, n = ref.mlp(layer, x, live), fused.mlp(layer, x, live)
        assert 0 < int(m.n_active) < bundle.config.ffn
        assert int(m.n_active) == int(n.n_active)
        np.testing.assert_array_equal(np.asarray(m.idx)[: int(m.n_active)], np.asarray(n.idx)[: int(n.n_active)])
        checked += 1
    assert checked == cfg.num_layers - 1 and calls and all(shape == (rows, cfg.hidden_size) for shape, _ in calls)
    # named after its part, so a profile counts it as router + selection (polar_jax.bench.breakdown)
    assert {part_of(kernel_name("nk", label), {}) for _, label in calls} == {"router"}


@pytest.mark.parametrize("at_17_32", [False, True])
def test_sparse_selector_fuses_the_routers_at_one_sequence_and_where_switched_on_at_17_to_32(opt_default, at_17_32,
                                                                                            monkeypatch):
    """One sequence: always. 17-32 rows (the split-K GEMV's product): only with FUSE_AT_FIRST_GEMV_ROWS (on since
    the H100 A/B of 2026-12-07)."""
    monkeypatch.setattr(sparsify, "FUSE_AT_FIRST_GEMV_ROWS", at_17_32)
    model, bundle = opt_default
    one = sparse_selector(model, bundle, batch=1, context=64, attn_density=0.5, policy="both")
    four = sparse_selector(model, bundle, batch=4, context=64, attn_density=0.5, policy="both")
    twenty = sparse_selector(model, bundle, batch=20, context=64, attn_density=0.5, policy="both")
    assert [b for b in range(1, 66) if fuse_routers_for(b)] == [1, *(range(17, 33) if at_17_32 else ())]
    assert one.fused_first and not four.fused_first and twenty.fused_first == at_17_32
    heads_only = sparse_selector(model, bundle, batch=1, context=64, attn_density=0.5, policy="heads")
    assert not heads_only.fused_first


@pytest.mark.parametrize("gemv", ["triton", "xla"])
def test_first_product_in_the_qkv_launch_selects_what_its_own_gemv_selects(opt_default, gemv, monkeypatch):
    """At 20 rows with `first_in_qkv` the routers' shared product comes from the Q/K/V launch (gemv_multi's
    float32 output; XLA's einsum where the GEMV does not run) and the step selects after Q/K/V: the step's
    logits are those of the product's own GEMV (float32 sums in another order: the same heads and neurons
    here), every sparse layer asks for it, and its own GEMV (`gemv_f32`) is never called."""
    from polar_jax.decode import decode_step, split_model
    from polar_jax.bench.synthetic import random_cache

    model, _ = opt_default
    cfg = model.config
    rows = 20
    rng = np.random.default_rng(9)
    bundle, _ = bundle_for_rows(cfg, rows, rng)
    graphdef, state = split_model(model)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, rows), jnp.int32)

    def step(selector):
        cache = random_cache(cfg, rows, 24, 12, model.dtype)
        return np.asarray(decode_step(graphdef, state, cache, tokens, selector, "triton", "triton", gemv)[0])

    own = router_selector(bundle, 0.5, 0.99, select_impl="triton", fuse_routers=True)
    want = step(own)
    heads_only = step(router_selector(bundle, 0.5, 0.99, mlp=False, select_impl="triton"))
    assert np.abs(want - heads_only).max() > 1e-4  # the MLP selection matters in this step
    in_qkv = router_selector(bundle, 0.5, 0.99, select_impl="triton", fuse_routers=True, first_in_qkv=True)
    asked = [layer for layer in range(cfg.num_layers) if in_qkv.first_product_weight(layer, rows) is not None]
    assert asked == [layer for layer in range(cfg.num_layers) if own._mlp_on(layer, rows)] and asked
    assert own.first_product_weight(1, rows) is None and in_qkv.first_product_weight(asked[0], 4) is None
    calls = []
    real = sparsify.gemv_f32
    monkeypatch.setattr(sparsify, "gemv_f32", lambda *a, **k: calls.append(1) or real(*a, **k))
    jax.clear_caches()
    got = step(in_qkv)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert not calls
    with_overlap = router_selector(bundle, 0.5, 0.99, select_impl="triton", fuse_routers=True, first_in_qkv=True,
                                   overlap=True)
    np.testing.assert_allclose(step(with_overlap), want, atol=1e-4, rtol=0)
