"""`calibrate` end to end on synthetic router data, against a plain restatement of the protocol: which split
it reads, the head-importance curves, the MLP k per batch size (non-decreasing), the MLP threshold rule
(thresholds, capacities, kept fraction), the adaptive head thresholds, dense layers, stored settings,
refusals."""

from __future__ import annotations

import argparse
import inspect

import numpy as np
import pytest

from polar_jax.errors import InputError
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.calibrate import (adaptive_thresholds, allocate_units, calibrate, calibrate_mlp_thresholds,
                                        importance_curve, monotone_k, union_recall_curve)
from polar_jax.routers.cli import register
from polar_jax.routers.config import MLPTable, SparsityConfig, budget_bounds

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
    return [min(N, max(ks[: i + 1])) for i in range(len(ks))]  # the union of more rows never needs fewer


def reference_threshold_rule(logits, labels, target, tile, batch_sizes, n_batches, seed, margin=1.1):
    """The threshold rule restated: per batch size, over random batches (same draws as above), the mean
    recall of the true union by {neurons whose max logit over the batch is > t}; the largest t (halfway
    down to the next lower logit of a true-union neuron) whose mean recall reaches the target; capacity =
    the most neurons kept in one batch, times the margin, rounded up to the tile, non-decreasing in B;
    the mean kept fraction."""
    rng = np.random.default_rng(seed)
    width = labels.shape[1]
    out_t, out_cap, out_kept = [], [], []
    for b in batch_sizes:
        draws = max(n_batches, 2048 // b)
        maxes, unions = [], []
        for _ in range(draws):
            idx = rng.choice(len(labels), size=b, replace=False)
            maxes.append(logits[idx].max(0))
            unions.append(labels[idx].any(0))
        maxes, unions = np.array(maxes), np.array(unions)
        sizes = unions.sum(1)

        def recall(t):
            return np.where(sizes > 0, ((maxes > t) & unions).sum(1) / np.maximum(sizes, 1), 1.0).mean()

        def reaches(v):  # keeping every value >= v reaches the target
            return recall(v - 1e-7 * (1 + abs(v))) >= target - 1e-9

        values = np.unique(maxes[unions])[::-1]  # descending
        if recall(values[0]) >= target - 1e-9:  # the batches with an empty union alone reach it
            t = float(values[0])
        elif not reaches(values[-1]):
            t = float(values[-1]) - 1.0
        else:
            lo, hi = 0, len(values) - 1  # recall grows as values are added: the first that reaches it
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if reaches(values[mid]) else (mid + 1, hi)
            t = float(values[lo] + values[lo + 1]) / 2 if lo + 1 < len(values) else \
                float(values[lo]) - 1e-3 * (1 + abs(float(values[lo])))
        counts = (maxes > t).sum(1)
        out_t.append(t)
        out_cap.append(min(width, int(np.ceil(max(counts) * margin / tile) * tile)) if max(counts) else tile)
        out_kept.append(np.mean(counts) / width)
    return out_t, [max(out_cap[: i + 1]) for i in range(len(out_cap))], out_kept


def reference_head_thresholds(logits, floor_frac, cap_frac):
    """Per k = 1..U, the smallest threshold (a logit value, or one below them all) at which the per-token
    count of units above it, clipped to the budget's bounds, averages at most k."""
    units = logits.shape[1]
    candidates = np.concatenate([[logits.min() - 1.0], np.unique(logits)])
    out = []
    for k in range(1, units + 1):
        lo, hi = budget_bounds(k, units, floor_frac, cap_frac)
        out.append(next(float(c) for c in candidates if np.clip((logits > c).sum(1), lo, hi).mean() <= k))
    return out


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
            thr, cap, kept = reference_threshold_rule(data.x[i][data.val] @ a @ bb, data.active[i][data.val],
                                                      t.recall, tile, (1, 4, 16), 8, i)
            np.testing.assert_allclose(t.thresholds[i], thr, rtol=1e-5, atol=1e-5)
            assert list(t.capacity[i]) == cap
            np.testing.assert_allclose(t.union[i], kept, rtol=1e-9)
        assert t.thresholds[0] == (-np.inf,) * 3 and t.capacity[0] == (N, N, N) and t.union[0] == (1.0,) * 3
    assert c.attn_thresholds[0] == (-np.inf,) * U
    for i in range(1, L):
        w, b = bundle.attn(i)
        np.testing.assert_allclose(c.attn_thresholds[i], reference_head_thresholds(
            data.x[i][data.val] @ w + b, c.attn_budget_floor, c.attn_budget_cap), rtol=1e-6, atol=1e-6)
    assert c.mlp_tables[1] == bundle.config.mlp_tables[1]
    higher = np.array(c.mlp_tables[2].k[1:]) >= np.array(c.mlp_tables[0].k[1:])
    assert higher.all() and (np.array(c.mlp_tables[2].k[1:]) > np.array(c.mlp_tables[0].k[1:])).any()
    assert any("layer 1: MLP at recall 0.9" in s for s in logs) and any("attention mass" in s for s in logs)


def test_calibrate_stores_layer_densities_and_refuses_bad_settings():
    data, bundle = FakeData(), make_bundle()
    out = calibrate(bundle, data, recalls=(0.9,), batch_sizes=(1,), layer_densities=(1.0, 0.5, 0.25),
                    log=lambda s: None, progress=False)
    assert out.config.attn_layer_densities == (1.0, 0.5, 0.25)
    assert out.config.attn_density == bundle.config.attn_density and out.config.mlp_tile == 32
    bad = [(dict(tile=0), "tile"), (dict(tile=2.5), "tile"), (dict(n_batches=0), "calibration batches"), (dict(dense_threshold=1.5), "dense fallback"), (dict(recalls=(0.0,)), "recall"),
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


def test_monotone_k_and_threshold_rule_edges():
    assert monotone_k([32, 24, 40, 16], 36) == [32, 32, 36, 36]  # running maximum, capped at N
    assert monotone_k([8], 64) == [8]
    logits = np.tile(np.arange(6.0), (20, 1))  # neuron j always has logit j
    labels = np.zeros((20, 6), bool)
    labels[:, 2] = True  # neuron 2 is always active: the threshold sits just under its logit
    t, cap, kept = calibrate_mlp_thresholds(logits, labels, 1.0, 2, (1, 3), n_batches=4)
    assert t == [pytest.approx(2 - 3e-3)] * 2
    assert cap == [6, 6]  # neurons 2..5 kept: 4 x 1.1 rounded up to the tile of 2, at most N
    np.testing.assert_allclose(kept, [4 / 6, 4 / 6])
    t, cap, _ = calibrate_mlp_thresholds(logits, labels, 1.0, 4, (1,), n_batches=4, margin=1.0)
    assert cap == [4]
    labels[:, 0] = True  # neurons 0 and 2: halfway between their logits is too high, so under the lowest
    t, _, _ = calibrate_mlp_thresholds(logits, labels, 1.0, 2, (1,), n_batches=4)
    assert t[0] == pytest.approx(-1e-3)
    t, _, _ = calibrate_mlp_thresholds(logits, labels, 0.5, 2, (1,), n_batches=4)
    assert t[0] == pytest.approx(1.0)  # one of the two suffices: halfway between 2 and 0
    t, _, _ = calibrate_mlp_thresholds(logits, labels, 1.5, 2, (1,), n_batches=4)
    assert t[0] == pytest.approx(-1.0)  # unreachable target: one below the lowest logit of an active neuron
    rare = np.zeros((20, 6), bool)
    rare[:2, 2] = True  # 18 of 20 tokens have nothing to find: those batches alone reach a recall of 0.5
    t, cap, kept = calibrate_mlp_thresholds(logits, rare, 0.5, 2, (1,), n_batches=4)
    assert t == [2.0] and kept == [pytest.approx(3 / 6)]  # nothing more needed: at the largest union logit
    with pytest.raises(InputError, match="held-out tokens"):
        calibrate_mlp_thresholds(logits, labels, 0.9, 2, (21,))
    flat = np.zeros((10, 4))  # all logits equal: 0 for the budgets a count of 0 or 4 clips to <= k, else lower
    np.testing.assert_allclose(adaptive_thresholds(flat, 0.5, 2.0), reference_head_thresholds(flat, 0.5, 2.0),
                               atol=1e-9)
    assert reference_head_thresholds(flat, 0.5, 2.0) == [0.0, 0.0, 0.0, -1.0]


def test_calibrate_cli_defaults_are_the_api_defaults():
    """`polar-jax calibrate` without options calibrates as `calibrate()` without arguments (tile, random
    batches per batch size, dense fallback threshold, recall targets)."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", "--bundle", "b", "--data", "d"])
    api = {k: v.default for k, v in inspect.signature(calibrate).parameters.items()}
    assert (args.tile, args.batches, args.dense_threshold) == (api["tile"], api["n_batches"], api["dense_threshold"])
    assert tuple(args.recall) == tuple(api["recalls"])
