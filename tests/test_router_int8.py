"""Int8 MLP routers for decoding (routers/quantize.py, router_selector(int8_mlp_router=True))."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
from conftest import load_cached
from polar_jax.routers import router_selector
from polar_jax.routers.quantize import int8_per_output


def test_int8_per_output_rounds_each_output_to_its_own_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 40)) * np.exp(rng.uniform(-3, 3, 40))[None, :]
    w[:, 7] = 0.0  # an all-zero output
    q, scale = int8_per_output(jnp.asarray(w), axis=1)
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.dtype == np.int8 and scale.shape == (40,) and np.all(np.abs(q) <= 127)
    np.testing.assert_allclose(scale, np.where(np.abs(w).max(0) > 0, np.abs(w).max(0) / 127, 1.0), rtol=1e-6)
    assert np.all(np.abs(q * scale[None, :] - w) <= scale[None, :] / 2 * (1 + 1e-5))
    assert np.all(np.abs(q).max(axis=0)[np.abs(w).max(0) > 0] == 127)  # the full range is used per output
    qr, sr = int8_per_output(jnp.asarray(w), axis=0)  # per row
    assert np.asarray(sr).shape == (6,) and np.all(np.abs(np.asarray(qr) * np.asarray(sr)[:, None] - w)
                                                   <= np.asarray(sr)[:, None] / 2 * (1 + 1e-5))


@pytest.fixture(scope="module")
def opt_default():
    model, _ = load_cached("polar-tiny-opt")
    return model, polar_jax.load_sparsity("default", model)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_int8_router_selects_nearly_the_same_neurons(opt_default, impl):
    """On the committed router and real activations' scale, the int8 router's union differs from the
    float router's only at neurons whose logit sits near the threshold."""
    model, bundle = opt_default
    c = bundle.config
    ref = router_selector(bundle, 0.5, 0.99, attn=False, select_impl=impl)
    q8 = router_selector(bundle, 0.5, 0.99, attn=False, select_impl=impl, int8_mlp_router=True)
    rng = np.random.default_rng(3)
    compared = 0
    for layer in range(c.num_layers):
        if ref.mlp_a[layer] is None:
            continue
        assert q8.mlp_a[layer].dtype == jnp.int8 and q8.mlp_b[layer].dtype == jnp.int8
        assert q8.mlp_b_scale[layer].shape == (c.ffn,)
        x = jnp.asarray(rng.standard_normal((4, model.config.hidden_size)), jnp.float32)
        live = jnp.asarray([True, True, True, False])
        a, b = ref.mlp(layer, x, live), q8.mlp(layer, x, live)
        if a is None:
            continue
        sa = set(np.asarray(a.idx)[: int(a.n_active)].tolist())
        sb = set(np.asarray(b.idx)[: int(b.n_active)].tolist())
        assert len(sa) > 0 and len(sa ^ sb) <= 0.03 * len(sa | sb), (layer, len(sa), len(sa ^ sb))
        # the logits themselves: the largest change is a few percent of their spread
        la, lb = ref._mlp_logits(layer, x), q8._mlp_logits(layer, x)
        assert float(jnp.max(jnp.abs(la - lb))) < 0.05 * float(jnp.std(la))
        compared += 1
    assert compared > 0


def test_int8_router_decodes_with_both_selection_impls(opt_default):
    """The sparse decode step with int8 routers: the Pallas (interpret) and XLA selection paths agree."""
    model, bundle = opt_default
    prompts = [[5, 17, 23, 42, 9], [7, 7, 31, 2, 11]]
    outs = []
    for impl in ("xla", "triton"):
        sel = router_selector(bundle, 0.5, 0.99, select_impl=impl, int8_mlp_router=True)
        outs.append(polar_jax.generate(model, prompts, 6, selector=sel, attn_impl=impl, mlp_impl=impl,
                                       eos_token_id=()))
    np.testing.assert_array_equal(outs[0], outs[1])


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
