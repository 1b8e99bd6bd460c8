"""Masked sparse evaluation (decode semantics) against an independent reference and against the real
sparse decode path (Pallas kernels' XLA implementations) on the same selections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_cached
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill
from polar_jax.eval.perplexity import perplexity
from polar_jax.eval.sparse_ppl import sparse_perplexity
from polar_jax.models.collect import group_norms
from polar_jax.routers import oracle_sparsifier, router_selector, router_sparsifier
from test_routers_bundle import random_bundle


class ReferenceRouterSparsifier:
    """Plain-Python restatement of the decode rule (argsort instead of top_k, explicit loops over layers):
    heads per (row, position) from the row's own router input; MLP neurons from scores summed over rows."""

    def __init__(self, bundle, rho, batch, start):
        self.b, self.c, self.start = bundle, bundle.config, start
        self.k_attn = max(1, int(np.floor(rho * self.c.attn_units + 1e-9)))
        self.k_mlp = self.c.mlp_k(0.99, batch) if self.c.mlp_router else None

    def _dense_prefix(self, mask, t_axis=1):
        pos = jnp.arange(mask.shape[t_axis]).reshape([-1 if i == t_axis else 1 for i in range(mask.ndim)])
        return jnp.where(pos < self.start, 1.0, mask)

    def heads_mask(self, layer, x, head_out):
        if layer == 0:
            return None
        w, b = self.b.attn(layer)
        s = x @ w + b
        rank = jnp.argsort(jnp.argsort(-s, axis=-1), axis=-1)
        return self._dense_prefix((rank < self.k_attn).astype(jnp.float32))

    def neurons_mask(self, layer, x, act):
        if layer == 0 or self.k_mlp is None or self.k_mlp[layer] is None:
            return None
        a, b = self.b.mlp(layer)
        s = jnp.sum(jnp.maximum((x @ a) @ b, 0), axis=0)  # [T, N]
        rank = jnp.argsort(jnp.argsort(-s, axis=-1), axis=-1)
        return self._dense_prefix((rank < self.k_mlp[layer]).astype(jnp.float32)[None])


def _tokens(model, b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, model.config.vocab_size, (b, t)), jnp.int32)


@pytest.mark.parametrize("name", ["polar-tiny-opt", "tiny-llama"])
def test_router_masks_equal_reference(name):
    model, _ = load_cached(name)
    bundle = random_bundle(model, seed=1)
    toks = _tokens(model, 4, 20)
    for start in (0, 7):
        got = model(toks, sparsifier=router_sparsifier(bundle, 0.5, 0.99, start=start))
        want = model(toks, sparsifier=ReferenceRouterSparsifier(bundle, 0.5, 4, start))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    dense = model(toks)
    assert float(jnp.max(jnp.abs(got - dense))) > 1e-2  # the masks do change the output


def test_oracle_masks_and_decode_semantics():
    model, _ = load_cached("tiny-llama")
    toks = _tokens(model, 3, 16, seed=2)
    sp = oracle_sparsifier(model.config, 0.5)
    head_out = jax.random.normal(jax.random.key(0), (3, 16, 16, 32))
    mask = np.asarray(sp.heads_mask(1, None, head_out))  # GQA: one entry per KV group
    norms = np.asarray(group_norms(jnp.sqrt(jnp.sum(head_out**2, -1)), 4))
    np.testing.assert_array_equal(mask, (np.argsort(np.argsort(-norms, -1), -1) < 2).astype(np.float32))
    assert sp.heads_mask(0, None, head_out) is None
    np.testing.assert_allclose(np.asarray(model(toks, sparsifier=oracle_sparsifier(model.config, 1.0))),
                               np.asarray(model(toks)), rtol=1e-6, atol=1e-6)  # density 1 = dense
    # Decode semantics: each position's selection uses only that position, so the future never leaks back.
    opt, _ = load_cached("polar-tiny-opt")
    bundle = random_bundle(opt, seed=3)
    sp = router_sparsifier(bundle, 0.3, 0.99)
    a = _tokens(opt, 4, 24, seed=4)
    b = a.at[:, 12:].set(_tokens(opt, 4, 12, seed=5))
    la, lb = opt(a, sparsifier=sp), opt(b, sparsifier=sp)
    np.testing.assert_allclose(np.asarray(la[:, :12]), np.asarray(lb[:, :12]), rtol=1e-5, atol=1e-5)
    act = jax.random.normal(jax.random.key(1), (4, 24, 1024))
    union = np.asarray(oracle_sparsifier(opt.config, 0.5).neurons_mask(1, None, act))
    np.testing.assert_array_equal(union, np.asarray(jnp.any(act > 0, axis=0, keepdims=True), np.float32))


def _decode_path_logits(model, toks, prompt_len, selector):
    """Dense prefill of the first `prompt_len` tokens, then teacher-forced sparse decode steps."""
    b, t = toks.shape
    graphdef, state = nnx.split(model)
    cache = KVCache.create(model.config, b, 64, model.dtype)
    logits, cache = prefill(graphdef, state, toks[:, :prompt_len], jnp.full((b,), prompt_len, jnp.int32), cache)
    out = [logits]
    for i in range(prompt_len, t - 1):
        logits, cache = decode_step(graphdef, state, cache, toks[:, i], selector)
        out.append(logits)
    return jnp.stack(out, axis=1)  # predictions for positions prompt_len .. t-1


@pytest.mark.parametrize("name", ["polar-tiny-opt", "tiny-llama"])
def test_masked_evaluation_equals_sparse_decode_path(name):
    model, _ = load_cached(name)
    bundle = random_bundle(model, seed=6)
    toks = _tokens(model, 4, 20, seed=7)
    p = 6
    for rho in (0.5, 0.25):
        masked = model(toks, sparsifier=router_sparsifier(bundle, rho, 0.99, start=p))[:, p - 1 : -1]
        decoded = _decode_path_logits(model, toks, p, router_selector(bundle, rho, 0.99))
        np.testing.assert_allclose(np.asarray(decoded), np.asarray(masked), rtol=2e-4, atol=2e-4)
    dense = model(toks)[:, p - 1 : -1]
    assert float(jnp.max(jnp.abs(decoded - dense))) > 1e-2


def test_sparse_perplexity_modes(wikitext_test):
    model, tok = load_cached("polar-tiny-opt")
    ids = np.asarray(tok.encode(wikitext_test.read_text()[:20000]))
    bundle = random_bundle(model, seed=8)
    kw = dict(seq_len=64, batch_size=4, max_tokens=512, progress=False)
    dense = perplexity(model, ids, **{k: v for k, v in kw.items()})
    assert sparse_perplexity(model, ids, None, "dense", **kw).ppl == dense.ppl
    full = sparse_perplexity(model, ids, None, "oracle", attn_density=1.0, **kw)
    np.testing.assert_allclose(full.ppl, dense.ppl, rtol=1e-5)  # ReLU true union + all heads is lossless
    orc = sparse_perplexity(model, ids, None, "oracle", attn_density=0.25, **kw)
    rnd = sparse_perplexity(model, ids, bundle, "router", attn_density=0.25, mlp_recall=0.99, **kw)
    assert dense.ppl < orc.ppl < rnd.ppl  # random routers are worse than the oracle at the same density
    assert rnd.tokens == 512
