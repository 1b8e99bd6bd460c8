"""`calibrate` end to end on synthetic router data, against a plain restatement of the protocol: which split
it reads, the head-importance curves, the MLP k per batch size, dense layers, stored settings, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from polar_jax.errors import InputError
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.calibrate import allocate_units, calibrate, importance_curve, union_recall_curve
from polar_jax.routers.config import MLPTable, SparsityConfig

L, D, U, N, TOKENS = 3, 8, 4, 48, 600


class FakeData:
    """The two CollectedData methods calibrate uses, over arrays made here."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(L, TOKENS, D)).astype(np.float32)
        self.norms = np.abs(rng.normal(size=(L, TOKENS, U))).astype(np.float32) + 0.1
        self.active = rng.random((L, TOKENS, N)) < 0.06
        self.val = np.sort(rng.permutation(TOKENS)[: TOKENS // 4])
        self.split_args = None

    def split(self, val_fraction, seed):
        self.split_args = (val_fraction, seed)
        return np.setdiff1d(np.arange(TOKENS), self.val), self.val

    def field(self, name, layer=None):
        return {"router_input": self.x, "unit_norm": self.norms, "mlp_active": self.active}[name][layer]


def make_bundle(seed: int = 1) -> SparsityBundle:
    rng = np.random.default_rng(seed)
    params = {}
    for i in range(1, L):
        params[f"attn.{i}.w"] = rng.normal(size=(D, U)).astype(np.float32)
        params[f"attn.{i}.b"] = rng.normal(size=(U,)).astype(np.float32)
        params[f"mlp.{i}.a"] = rng.normal(size=(D, 4)).astype(np.float32)
        params[f"mlp.{i}.b"] = rng.normal(size=(4, N)).astype(np.float32)
    old = MLPTable(0.5, (1,), tuple((N,) for _ in range(L)))  # replaced by a new table of the same recall
    cfg = SparsityConfig(num_layers=L, attn_units=U, unit="head", ffn=N, mlp_router=True, mlp_rank=4,
                         mlp_tables=(old, MLPTable(0.7, (1,), tuple((N,) for _ in range(L)))),
                         train={"val_fraction": 0.25, "seed": 3})
    return SparsityBundle(cfg, params, {"arch_hash": "x", "probe": {}})


def reference_importance(scores, norms):
    """Mean over tokens of the fraction of squared-norm mass in each token's top-k units, k = 0..U."""
    out = np.zeros(scores.shape[1] + 1)
    for s, m in zip(scores, np.square(norms.astype(np.float64))):
        ranked = m[np.argsort(-s, kind="stable")]
        out[1:] += np.cumsum(ranked) / m.sum()
    return out / len(scores)


def reference_k(scores, labels, target, tile, batch_sizes, n_batches, seed):
    """The MLP protocol restated: per batch size, the mean recall over random batches (draws in this order
    from one generator) of the true union by the top-k of summed scores; smallest tile multiple >= target."""
    rng = np.random.default_rng(seed)
    ks = []
    for b in batch_sizes:
        draws = max(n_batches, 2048 // b)
        curve = np.zeros(labels.shape[1])
        for _ in range(draws):
            idx = rng.choice(len(labels), size=b, replace=False)
            union = labels[idx].any(0)
            order = np.argsort(-scores[idx].sum(0), kind="stable")
            curve += np.cumsum(union[order]) / union.sum() if union.any() else 1.0
        curve /= draws
        ks.append(next((min(k, N) for k in range(tile, N + tile, tile) if curve[min(k, N) - 1] >= target - 1e-12), N))
    return ks


def test_calibrate_matches_the_protocol_restated():
    data, bundle = FakeData(), make_bundle()
    logs = []
    bs, tile = (4, 1, 16, 4), 8  # unsorted, with a duplicate: calibrated as (1, 4, 16)
    out = calibrate(bundle, data, recalls=(0.5, 0.9), batch_sizes=bs, tile=tile, n_batches=8, dense_threshold=0.8,
                    attn_density=0.25, log=logs.append, progress=False)
    assert data.split_args == (0.25, 3)  # the split the routers were trained with
    c = out.config
    assert (c.mlp_tile, c.mlp_dense_threshold, c.attn_density, c.attn_layer_densities) == (tile, 0.8, 0.25, None)
    assert out.params is bundle.params and out.signature == bundle.signature
    np.testing.assert_allclose(c.attn_importance[0], np.linspace(0, 1, U + 1))  # dense layer: flat curve
    for i in range(1, L):
        x = data.x[i][data.val]
        w, b = bundle.attn(i)
        np.testing.assert_allclose(c.attn_importance[i], reference_importance(x @ w + b, data.norms[i][data.val]),
                                   rtol=1e-6)
    assert [t.recall for t in c.mlp_tables] == [0.5, 0.7, 0.9]  # 0.5 replaced, 0.7 kept, sorted
    for t in (c.mlp_tables[0], c.mlp_tables[2]):
        assert t.batch_sizes == (1, 4, 16)
        assert t.k[0] == (N, N, N)
        for i in range(1, L):
            a, bb = bundle.mlp(i)
            scores = np.maximum(data.x[i][data.val] @ a @ bb, 0)
            assert list(t.k[i]) == reference_k(scores, data.active[i][data.val], t.recall, tile, (1, 4, 16), 8, i)
    assert c.mlp_tables[1] == bundle.config.mlp_tables[1]
    higher = np.array(c.mlp_tables[2].k[1:]) >= np.array(c.mlp_tables[0].k[1:])
    assert higher.all() and (np.array(c.mlp_tables[2].k[1:]) > np.array(c.mlp_tables[0].k[1:])).any()
    assert any("layer 1: MLP k at recall 0.9" in s for s in logs) and any("attention mass" in s for s in logs)


def test_calibrate_stores_layer_densities_and_refuses_bad_settings():
    data, bundle = FakeData(), make_bundle()
    out = calibrate(bundle, data, recalls=(0.9,), batch_sizes=(1,), layer_densities=(1.0, 0.5, 0.25),
                    log=lambda s: None, progress=False)
    assert out.config.attn_layer_densities == (1.0, 0.5, 0.25)
    assert out.config.attn_density == bundle.config.attn_density and out.config.mlp_tile == 32
    bad = [(dict(tile=0), "tile"), (dict(dense_threshold=1.5), "dense fallback"), (dict(recalls=(0.0,)), "recall"),
           (dict(batch_sizes=()), "batch sizes"), (dict(batch_sizes=(0, 2)), "batch sizes"),
           (dict(layer_densities=(1.0, 0.5)), "need 3 layer densities"),
           (dict(layer_densities=(1.0, 0.5, 0.0)), "layer density"), (dict(attn_density=2.0), r"\(0, 1\]")]
    for kw, words in bad:
        with pytest.raises(InputError, match=words):
            calibrate(bundle, data, **{"batch_sizes": (1, 2), "log": lambda s: None, "progress": False, **kw})
    with pytest.raises(InputError, match="held-out tokens"):
        calibrate(bundle, data, batch_sizes=(1, 1000), log=lambda s: None, progress=False)


def test_importance_curve_and_allocation_edges():
    rng = np.random.default_rng(2)
    s, n = rng.normal(size=(30, 5)), np.abs(rng.normal(size=(30, 5)))
    np.testing.assert_allclose(importance_curve(s, n), reference_importance(s, n), rtol=1e-9)
    zero = importance_curve(s, np.zeros_like(n))
    np.testing.assert_array_equal(zero, np.zeros(6))  # no mass: no division by zero
    flat = np.linspace(0, 1, 5)
    assert allocate_units([flat, flat, flat], 2, 4) == [1, 1, 1]  # never below one unit per layer
    assert allocate_units([flat, flat, flat], 5, 4) == [2, 2, 1]  # equal gains: fewest units, then lowest layer
    steep = np.array([0, 0.9, 0.95, 0.99, 1.0])
    assert allocate_units([flat, steep], 4, 4) == [3, 1]
    assert sum(allocate_units([steep, flat, steep], 7, 4)) == 7


def test_union_recall_curve_edges():
    labels = np.zeros((10, 6), bool)
    np.testing.assert_array_equal(union_recall_curve(np.ones((10, 6)), labels, 3, 4, np.random.default_rng(0)),
                                  np.ones(6))  # empty union: every k has full recall
    labels[:, 2] = True
    scores = np.tile(np.arange(6, 0, -1.0), (10, 1))  # neuron 2 ranks third
    np.testing.assert_array_equal(union_recall_curve(scores, labels, 10, 2, np.random.default_rng(0)),
                                  [0, 0, 1, 1, 1, 1])
