"""Router pipeline internals on synthetic problems: config/tables, calibration, allocation, training."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax.errors import InputError
from polar_jax.routers.calibrate import allocate_units, smallest_k, union_recall_curve
from polar_jax.routers.config import MLPTable, SparsityConfig, check_density, units_kept
from polar_jax.routers.train import TrainOptions, recall_at_count, recall_at_k, train_attention_router, train_mlp_router, weighted_bce
from polar_jax.selection import (adaptive_counts, capped_union_mask, keep_prefix_dense, topk_mask, union_scores,
                                 union_threshold_mask, union_topk)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_density_outside_unit_interval_is_refused(bad):
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        check_density(bad)


def test_units_kept_follows_floor_with_at_least_one():
    assert [units_kept(r, 16) for r in (0.75, 0.5, 0.3, 0.01, 1.0)] == [12, 8, 4, 1, 16]
    assert [units_kept(r, 4) for r in (0.75, 0.5, 0.3)] == [3, 2, 1]


def test_table_interpolates_in_log_batch_and_rounds_to_tile():
    t = MLPTable(0.99, (1, 4, 16), ((64, 64, 64), (32, 96, 160)))
    assert [t.k_for(1, b, 32, 256) for b in (1, 4, 16)] == [32, 96, 160]  # exact at calibrated sizes
    assert t.k_for(1, 2, 32, 256) == 64  # halfway in log2 between 32 and 96 -> 64
    assert t.k_for(1, 8, 32, 256) == 128  # halfway between 96 and 160 -> 128
    assert t.k_for(1, 3, 32, 256) == 96  # 32 + 0.79*64 = 82.6 -> rounded up to 96
    assert t.k_for(1, 64, 32, 256) == 160 and t.k_for(1, 0, 32, 256) == 32  # clamped outside


def test_config_dense_fallback_and_missing_table():
    t = MLPTable(0.99, (1, 8), ((128, 128), (32, 120)))
    c = SparsityConfig(num_layers=2, attn_units=8, unit="head", ffn=128, mlp_router=True, mlp_rank=4,
                       mlp_tables=(t,), mlp_dense_threshold=0.9)
    assert c.mlp_k(0.99, 1) == (None, 32)
    assert c.mlp_k(0.99, 8) == (None, None)  # 120 / 128 > 0.9: dense fallback
    with pytest.raises(InputError, match="recall 0.95"):
        c.mlp_k(0.95, 1)
    assert c.attn_k(0.5) == (8, 4)
    assert SparsityConfig.from_dict(c.to_dict()) == c


def test_calibration_on_synthetic_table_is_exact():
    """Every token has the same 20 active neurons; the scores rank 19 of them first and the 20th at rank
    30, so recall(k) = k/20 for k < 19, 0.95 for 19 <= k < 30, 1 from k = 30: exact answers per target."""
    rng = np.random.default_rng(0)
    n_tok, width = 300, 64
    active = rng.permutation(width)[:20]
    labels = np.zeros((n_tok, width), bool)
    labels[:, active] = True
    rank_order = np.concatenate([active[:19], [x for x in range(width) if x not in active][:10], active[19:]])
    rank_order = np.concatenate([rank_order, [x for x in range(width) if x not in rank_order]])
    base = np.empty(width)
    base[rank_order] = np.arange(width, 0, -1) * 1.0
    scores = base[None] + rng.uniform(0, 0.01, (n_tok, width))  # noise below the gaps keeps the order
    for batch in (1, 4, 32):
        curve = union_recall_curve(scores, labels, batch, 10, np.random.default_rng(1))
        np.testing.assert_allclose(curve[:18], np.arange(1, 19) / 20)
        np.testing.assert_allclose(curve[18:29], 0.95)
        np.testing.assert_allclose(curve[29:], 1.0)
        assert smallest_k(curve, 0.95, 8) == 24
        assert smallest_k(curve, 0.99, 8) == 32
        assert smallest_k(curve, 0.5, 8) == 16
        assert smallest_k(curve, 0.99, 1) == 30


def test_union_recall_curve_matches_brute_force():
    rng = np.random.default_rng(3)
    labels = rng.random((50, 40)) < 0.1
    scores = rng.normal(size=(50, 40))
    got = union_recall_curve(scores, labels, 4, 7, np.random.default_rng(5))
    replay = np.random.default_rng(5)
    want = np.zeros(40)
    for _ in range(7):
        idx = replay.choice(50, size=4, replace=False)
        union = set(np.flatnonzero(labels[idx].any(0)))
        order = list(np.argsort(-scores[idx].sum(0), kind="stable"))
        for k in range(1, 41):
            want[k - 1] += 1.0 if not union else len(union & set(order[:k])) / len(union)
    np.testing.assert_allclose(got, want / 7)


def test_allocate_units_keeps_total_and_favours_important_layers():
    flat = np.linspace(0, 1, 9)  # every unit equally important
    steep = np.concatenate([[0], 1 - 0.5 ** np.arange(1, 9)])  # first units carry the mass
    ks = allocate_units([flat, steep, flat], 13, 8)
    assert ks == [5, 3, 5]  # the steep layer stops growing once its marginal mass falls below the flat ones'
    assert allocate_units([flat, flat], 40, 8) == [8, 8]  # capped at U per layer


def test_weighted_bce_matches_formula():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(5, 7)), rng.random((5, 7)) < 0.3
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    want = np.mean(y * sp(-z) + 0.2 * (~y) * sp(z))
    np.testing.assert_allclose(float(weighted_bce(z, y, 0.2)), want, rtol=1e-5)


def test_recall_metrics_match_numpy():
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=(20, 12)).astype(np.float32), rng.random((20, 12)) < 0.3
    top3 = np.argsort(-s, axis=1)[:, :3]
    want = np.mean([len(set(top3[i]) & set(np.flatnonzero(y[i]))) / max(y[i].sum(), 1) for i in range(20)])
    np.testing.assert_allclose(float(recall_at_k(s, y, 3)), want, rtol=1e-5)
    wantc = np.mean([1.0 if y[i].sum() == 0 else
                     len(set(np.argsort(-s[i])[: y[i].sum()]) & set(np.flatnonzero(y[i]))) / y[i].sum() for i in range(20)])
    np.testing.assert_allclose(float(recall_at_count(s, y)), wantc, rtol=1e-5)


def _split(x, *ys, n_val=1000):
    return [x[:-n_val], *(y[:-n_val] for y in ys)], [x[-n_val:], *(y[-n_val:] for y in ys)]


def test_attention_router_learns_a_realizable_top_k():
    """Labels are the top-4 of 8 units by exp(x W): a linear router can reach recall 1; training must get
    close, and a random router stays near the chance level k/U = 0.5."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 32)).astype(np.float32)
    norms = np.exp(x @ rng.normal(size=(32, 8)).astype(np.float32) * 0.5)
    (xt, nt), (xv, nv) = _split(x, norms)
    opts = TrainOptions(epochs=8, lr=1e-2, batch_size=256, seed=0)
    router, info = train_attention_router(xt, nt, xv, nv, 4, opts, log=lambda s: None, progress=False)
    assert info["best_val_recall"] > 0.9
    assert len(info["history"]) >= 1 and info["history"][0]["val_recall"] <= info["best_val_recall"]
    router2, info2 = train_attention_router(xt, nt, xv, nv, 4, opts, log=lambda s: None, progress=False)
    np.testing.assert_array_equal(np.asarray(router.w[...]), np.asarray(router2.w[...]))  # seeded: deterministic


def test_mlp_router_learns_a_realizable_low_rank_mask():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6000, 32)).astype(np.float32)
    pre = x @ rng.normal(size=(32, 8)) @ rng.normal(size=(8, 128)) / 6
    act = pre > 2.5 * pre.std()  # ~1-5% active (ReLU-like sparsity), exactly a thresholded rank-8 map
    (xt, at), (xv, av) = _split(x, act)
    opts = TrainOptions(epochs=8, lr=1e-2, batch_size=256, seed=0)
    _, info = train_mlp_router(xt, at, xv, av, 8, opts, log=lambda s: None, progress=False)
    assert 0.005 < act.mean() < 0.1
    assert info["best_val_recall"] > 0.85


def test_union_rules_and_masks_against_numpy():
    """The MLP union rules and masks of polar_jax.selection on their own (the decode-path tests share them
    with their reference, so only a NumPy restatement can catch a wrong rule): the paper's batch scores
    (ReLU'd logits summed over live rows), the threshold union over live rows, its capacity cap (lowest
    ids), the paper's top-k union, top-k masks with ties to the lower index, the dense prompt prefix."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(4, 3, 40)).astype(np.float32)  # [B, T, N]; many rows negative
    relu = np.maximum(logits, 0)
    np.testing.assert_allclose(np.asarray(union_scores(logits)), relu.sum(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(union_scores(logits, axis=1)), relu.sum(1), rtol=1e-6)
    # A row of large negative logits must not pull a neuron down (it would without the ReLU).
    neg = logits.copy()
    neg[0] = -100.0
    np.testing.assert_allclose(np.asarray(union_scores(neg)), relu[1:].sum(0), rtol=1e-6)
    live = np.array([True, False, True, True])
    np.testing.assert_allclose(np.asarray(union_scores(neg, jnp.asarray(live))), relu[[2, 3]].sum(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(union_scores(logits.transpose(1, 0, 2), jnp.asarray(live), axis=1)),
                               relu[live].sum(0), rtol=1e-6)

    t = 0.8
    np.testing.assert_array_equal(np.asarray(union_threshold_mask(logits, t)), (logits > t).any(0))
    np.testing.assert_array_equal(np.asarray(union_threshold_mask(logits, t, jnp.asarray(live))),
                                  (logits[live] > t).any(0))
    np.testing.assert_array_equal(np.asarray(union_threshold_mask(logits.transpose(1, 0, 2), t, jnp.asarray(live),
                                                                  axis=1)), (logits[live] > t).any(0))
    np.testing.assert_array_equal(np.asarray(union_threshold_mask(logits, logits.max() + 1)), False)
    # Thresholds are router logits and can be negative: a dead row must still count for nothing.
    low = logits.copy()
    low[live, :, :5] = -3.0  # every live row far below the threshold on the first 5 neurons
    want = (low[live] > -1.0).any(0)
    assert not want[:, :5].any() and want.any()
    np.testing.assert_array_equal(np.asarray(union_threshold_mask(low, -1.0, jnp.asarray(live))), want)

    keep = (logits > 0.3).any(0)  # [T, N]
    for cap in (0, 1, 5, int(keep.sum(-1).min()), 40):
        want = np.zeros_like(keep)
        for r in range(keep.shape[0]):
            want[r, np.flatnonzero(keep[r])[:cap]] = True
        np.testing.assert_array_equal(np.asarray(capped_union_mask(jnp.asarray(keep), cap)), want)

    scores2 = relu[:, 0].sum(0)  # [N], the batch scores of one token
    order = np.argsort(-scores2, kind="stable")
    sel = union_topk(logits[:, 0], 7, 12)
    np.testing.assert_array_equal(np.asarray(sel.idx), order[:12])
    assert int(sel.n_active) == 7 and not sel.dense
    assert int(union_topk(logits[:, 0], 30, 12).n_active) == 12  # k is capped by the capacity
    sel = union_topk(logits[:, 0], 5, 8, jnp.asarray(live))
    np.testing.assert_array_equal(np.asarray(sel.idx), np.argsort(-relu[live, 0].sum(0), kind="stable")[:8])

    union = relu.sum(0)  # [T, N]
    for k in (1, 7, 40):
        mask = np.asarray(topk_mask(union, k))
        assert mask.dtype == np.float32 and (mask.sum(-1) == k).all()
        want = np.argsort(-union, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(mask, np.stack([np.isin(np.arange(40), w) for w in want]).astype(np.float32))
    ties = np.array([1.0, 3.0, 3.0, 0.5, 3.0], np.float32)
    np.testing.assert_array_equal(np.asarray(topk_mask(ties, 2)), [0, 1, 1, 0, 0])

    m = np.zeros((2, 6, 5), np.float32)
    np.testing.assert_array_equal(np.asarray(keep_prefix_dense(m, 0)), m)
    kept = np.asarray(keep_prefix_dense(m, 4))
    assert (kept[:, :4] == 1).all() and (kept[:, 4:] == 0).all()
    kept = np.asarray(keep_prefix_dense(np.zeros((3, 2, 6)), 2, time_axis=2))
    assert (kept[..., :2] == 1).all() and (kept[..., 2:] == 0).all()


def test_adaptive_counts_are_the_units_above_the_threshold_clipped():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(adaptive_counts(scores, 0.5, 1, 3)), [2, 1, 3])
    np.testing.assert_array_equal(np.asarray(adaptive_counts(scores, 0.5, 0, 4)), [2, 0, 4])
    np.testing.assert_array_equal(np.asarray(adaptive_counts(scores, 0.0, 0, 4)), [4, 0, 4])  # strictly above
    assert np.asarray(adaptive_counts(scores, 0.5, 1, 3)).dtype == np.int32
