"""polar_jax.graph: the model graph as a jit static argument that hashes once."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import load_cached
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill, split_model
from polar_jax.graph import Graph, merge, split


class _CountingDef:
    """Stands in for an nnx GraphDef: counts how often it is hashed."""

    def __init__(self, key):
        self.key, self.hashes = key, 0

    def __hash__(self):
        self.hashes += 1
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _CountingDef) and self.key == other.key


def test_graph_hashes_its_graphdef_once_and_compares_by_value():
    d = _CountingDef("a")
    g = Graph(d)
    for _ in range(5):
        hash(g)
    assert d.hashes == 1
    assert g == g and g == Graph(_CountingDef("a")) and g != Graph(_CountingDef("b")) and g != d


def test_jit_reuses_its_trace_for_the_same_graph():
    traces = []

    @functools.partial(jax.jit, static_argnames=("g",))
    def f(g, x):
        traces.append(1)
        return x + 1

    d = _CountingDef("m")
    g = Graph(d)
    for _ in range(4):
        f(g, jnp.zeros(()))
    assert len(traces) == 1 and d.hashes == 1


def test_split_model_round_trips_and_decodes_like_plain_nnx():
    model, _ = load_cached("tiny-llama")
    graph, state = split_model(model)
    assert isinstance(graph, Graph)
    toks = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (2, 7)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(merge(graph, state)(toks)), np.asarray(model(toks)))
    plain, _ = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(merge(plain, state)(toks)), np.asarray(model(toks)))
    again, _ = split(model)
    assert again == graph and hash(again) == hash(graph)  # a fresh split hits the same jit cache entry
    cache = KVCache.create(model.config, 2, 16, model.dtype)
    _, cache = prefill(graph, state, toks[:, :6], jnp.full((2,), 6, jnp.int32), cache)
    logits, _ = decode_step(graph, state, cache, toks[:, 6])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(toks)[:, -1]), atol=2e-4, rtol=0)
