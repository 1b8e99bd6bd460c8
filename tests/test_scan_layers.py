"""The layer function under `lax.scan` over stacked weights (issue 12): the same numbers as the unrolled
loop in every mode, one compiled layer instead of `num_layers`, and a clear refusal for sparse steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_cached
from polar_jax.cache import KVCache
from polar_jax.errors import InputError
from polar_jax.routers import router_selector
from test_routers_bundle import random_bundle


def _tokens(model, b: int, t: int, seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(3, model.config.vocab_size, (b, t)), jnp.int32)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_scanned_layers_equal_unrolled_in_every_mode(name):
    model, _ = load_cached(name)
    stacked = model.stack_layers()
    assert stacked.num_layers == model.config.num_layers
    toks = _tokens(model, 3, 12, seed=4)

    full = jax.jit(lambda m, t: m(t))(model, toks)
    scanned = jax.jit(lambda m, t, s: m(t, stacked=s))(model, toks, stacked)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(full), atol=2e-5, rtol=0)

    lengths = jnp.asarray([9, 6, 8], jnp.int32)  # ragged prompts: padding slots must be handled alike
    caches = {}
    for label, st in (("unrolled", None), ("scanned", stacked)):
        cache = KVCache.create(model.config, 3, 32, model.dtype)
        logits, cache = jax.jit(lambda m, c, s: m.prefill(toks[:, :9], lengths, c, stacked=s))(model, cache, st)
        outs = [logits]
        for i in range(9, 12):
            logits, cache = jax.jit(lambda m, c, t, s: m.decode(t, c, attn_impl="xla", mlp_impl="xla", stacked=s))(
                model, cache, toks[:, i], st)
            outs.append(logits)
        caches[label] = (cache, outs)
    (c_u, o_u), (c_s, o_s) = caches["unrolled"], caches["scanned"]
    for a, b in zip(o_u, o_s):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=0)
    for a, b in zip(c_u.k + c_u.v, c_s.k + c_s.v):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=0)
    assert np.asarray(c_s.lengths).tolist() == np.asarray(c_u.lengths).tolist() == [12, 9, 11]


def test_scan_compiles_one_layer():
    """The scanned program holds one layer's projections inside a loop; the unrolled one holds all of them.
    (A scan that XLA or the code quietly unrolled would show num_layers times the dots.)"""
    model, _ = load_cached("tiny-llama")
    toks = _tokens(model, 1, 8, seed=2)
    hlo_unrolled = jax.jit(lambda m, t: m(t)).lower(model, toks).as_text()
    hlo_scanned = jax.jit(lambda m, t, s: m(t, stacked=s)).lower(model, toks, model.stack_layers()).as_text()
    dots_unrolled = hlo_unrolled.count("stablehlo.dot_general")
    dots_scanned = hlo_scanned.count("stablehlo.dot_general")
    assert "stablehlo.while" in hlo_scanned and "stablehlo.while" not in hlo_unrolled
    per_layer = (dots_unrolled - 1) // model.config.num_layers  # the LM head is the one dot outside the layers
    assert model.config.num_layers > 1 and dots_scanned == per_layer + 1, (dots_unrolled, dots_scanned)


def test_scan_refuses_sparse_steps():
    model, _ = load_cached("tiny-llama")
    selector = router_selector(random_bundle(model), attn_density=0.5)
    cache = KVCache.create(model.config, 2, 16, model.dtype)
    _, cache = model.prefill(_tokens(model, 2, 4, seed=1), jnp.asarray([4, 4], jnp.int32), cache)
    with pytest.raises(InputError, match="dense only"):
        model.decode(jnp.asarray([5, 6], jnp.int32), cache, selector=selector, attn_impl="xla", mlp_impl="xla",
                     stacked=model.stack_layers())
    with pytest.raises(InputError, match="dense only"):
        model(_tokens(model, 1, 4, seed=3), collect=True, stacked=model.stack_layers())
