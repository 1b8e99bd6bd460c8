"""One product for both routers' first stage (router_selector(fuse_routers=True)), used at B=1."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
from conftest import load_cached
from polar_jax.routers import router_selector
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


def test_sparse_selector_fuses_the_routers_at_one_sequence_only(opt_default):
    model, bundle = opt_default
    one = sparse_selector(model, bundle, batch=1, context=64, attn_density=0.5, policy="both")
    four = sparse_selector(model, bundle, batch=4, context=64, attn_density=0.5, policy="both")
    assert fuse_routers_for(1) and not fuse_routers_for(2)
    assert one.fused_first and not four.fused_first
    heads_only = sparse_selector(model, bundle, batch=1, context=64, attn_density=0.5, policy="heads")
    assert not heads_only.fused_first
