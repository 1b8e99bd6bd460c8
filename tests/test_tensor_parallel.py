"""Tensor-parallel decoding (issue 15) on CPU.

The sharded checks need 4 devices; XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before
jax starts, so they run in a subprocess (tests/tp_checks.py) and the rest of the suite keeps one device.
The one-device parts (the balanced top-k rule and its masked evaluation) run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
from conftest import load_cached, model_dir
from polar_jax.bench.decode_bench import heads_kept
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill, split_model
from polar_jax.errors import InputError
from polar_jax.routers import router_selector, router_sparsifier
from polar_jax.selection import balanced_top_units, balanced_unit_mask, shard_budget
from polar_jax.sharding import make_mesh
from test_sparse_eval import _tokens

TESTS = Path(__file__).resolve().parent


def fake_devices_env(n: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_checks(*args: str, timeout: int = 400) -> str:
    res = subprocess.run([sys.executable, str(TESTS / "tp_checks.py"), *args], env=fake_devices_env(4),
                         capture_output=True, text=True, timeout=timeout, cwd=TESTS.parent)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert f"ALL OK tp_checks.py {args[0]}" in res.stdout, out[-6000:]
    return res.stdout


# ---- on 4 fake devices: meshes (1,4), (2,2), (4,1) ------------------------------------------------------------
def test_sharded_default_model_loader_tokens_and_mlp_union():
    """Embedded OPT model: the loader places each tensor's slices on their devices (per-device bytes, slice
    reads); greedy tokens dense / sparse global / sparse balanced on every mesh equal one device's; the MLP
    union is per shard; generate_stream (prefill + decode_step on the mesh) agrees."""
    out = run_checks("default")
    for mesh in ("(1,4)", "(2,2)", "(4,1)"):
        assert f"ok default dense mesh {mesh}" in out and f"ok default sparse global top-k mesh {mesh}" in out
    assert "ok default sparse balanced top-k mesh (1,4)" in out and "ok MLP union per shard" in out


def test_sharded_gqa_model_loader_and_tokens():
    """tiny-llama (GQA 16 query heads / 4 KV groups, loaded from its HF folder): the same checks, heads
    sparse (KV groups per shard)."""
    out = run_checks("llama", str(model_dir("tiny-llama")), str(TESTS))
    assert "ok tiny-llama sparse balanced top-k mesh (2,2)" in out and "ok slice reads tiny-llama" in out


# ---- the balanced rule on one device ----------------------------------------------------------------------------
def test_balanced_top_units_keeps_the_best_of_every_shard():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 16)).astype(np.float32)
    for shards, k in ((2, 3), (4, 1), (4, 2), (1, 5)):
        ids = np.asarray(balanced_top_units(jnp.asarray(scores), k, shards))
        per = 16 // shards
        for r in range(5):
            want = np.concatenate([s * per + np.argsort(-scores[r, s * per:(s + 1) * per], kind="stable")[:k]
                                   for s in range(shards)])
            np.testing.assert_array_equal(ids[r], want)
        mask = np.asarray(balanced_unit_mask(jnp.asarray(scores), k, shards))
        assert (mask.reshape(5, shards, per).sum(-1) == k).all()
        np.testing.assert_array_equal(np.sort(np.nonzero(mask)[1].reshape(5, -1)), np.sort(ids))
    assert [shard_budget(k, 4) for k in (1, 4, 5, 8)] == [1, 1, 2, 2]


@pytest.fixture(scope="module")
def opt_default():
    model, _ = load_cached("polar-tiny-opt")
    return model, polar_jax.load_sparsity("default", model)


@pytest.mark.parametrize("balance,adaptive", [(2, False), (4, True)])
def test_balanced_decode_equals_its_masked_evaluation(opt_default, balance, adaptive):
    """Decoding with balanced top-k computes what the masked evaluation (the perplexity of
    benchmarks/accuracy/tp_balance.py) predicts, and it differs from global top-k."""
    model, bundle = opt_default
    toks = _tokens(model, 4, 12, seed=3)
    p = 6
    sp = router_sparsifier(bundle, 0.5, 0.99, start=p, adaptive=adaptive, balance=balance)
    masked = model(toks, sparsifier=sp)[:, p - 1: -1]
    glob = model(toks, sparsifier=router_sparsifier(bundle, 0.5, 0.99, start=p, adaptive=adaptive))[:, p - 1: -1]
    sel = router_selector(bundle, 0.5, 0.99, adaptive=adaptive, select_impl="xla", balance=balance)
    graphdef, state = split_model(model)
    cache = KVCache.create(model.config, 4, 32, model.dtype)
    logits, cache = prefill(graphdef, state, toks[:, :p], jnp.full((4,), p, jnp.int32), cache)
    out = [logits]
    for i in range(p, toks.shape[1] - 1):
        logits, cache = decode_step(graphdef, state, cache, toks[:, i], sel, "xla", "xla")
        out.append(logits)
    decoded = jnp.stack(out, axis=1)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(masked), rtol=2e-4, atol=2e-4)
    assert float(jnp.max(jnp.abs(masked - glob))) > 1e-3


def test_a_balanced_budget_that_reaches_every_head_runs_dense_attention(opt_default):
    """ceil(k / n) heads per shard on n shards can be every head (polar-tiny-opt: 8 heads, k = 1 on 8 shards):
    such a layer selects nothing and says so (`attn_kept`), where a smaller budget stays sparse."""
    model, bundle = opt_default
    units = model.config.num_heads
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, model.config.hidden_size)), jnp.float32)
    live = jnp.ones((3,), bool)
    for density, balance, kept in ((1 / units, 8, 8), (2 / units, 4, 4), (1 / units, 2, 2), (2 / units, 1, 2)):
        sel = router_selector(bundle, density, select_impl="xla", balance=balance)
        layers = [i for i, w in enumerate(sel.attn_w) if w is not None]
        assert layers and [sel.attn_kept(i) for i in layers] == [kept] * len(layers), (density, balance)
        got = sel.attention(layers[0], x, live)
        if kept == units:
            assert got is None  # dense attention, no router work
        else:
            assert got.groups.shape == (3, kept) and np.asarray(got.n_active).tolist() == [kept] * 3


def test_an_adaptive_budget_whose_floor_reaches_every_head_runs_dense_attention(opt_default):
    """Adaptive budgets keep [floor, cap] units per row (per shard when balanced). Once ceil(floor / n) is all of
    a shard's heads every row keeps every head, so the layer selects nothing; a smaller floor stays adaptive."""
    model, bundle = opt_default
    units = model.config.num_heads
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, model.config.hidden_size)), jnp.float32)
    live = jnp.ones((3,), bool)
    for balance in (1, 2, 8):
        sel = router_selector(bundle, 0.25, select_impl="xla", balance=balance, adaptive=True)
        layers = [i for i, w in enumerate(sel.attn_w) if w is not None]
        assert layers and sel.budgets is not None
        for i in layers:
            floor = sel.budgets[i][1]
            assert 1 <= floor < units  # so only the split over 8 shards (1 head each) reaches every head
            per_shard = units // balance
            assert sel.attn_floor(i) == min(shard_budget(floor, balance), per_shard) * balance
            got = sel.attention(i, x, live)
            if balance == 8:
                assert sel.attn_floor(i) == units and got is None  # dense attention, no router work
                assert heads_kept(sel)[layers.index(i)] == units  # and `bench decode` reports it so
            else:
                n = np.asarray(got.n_active)
                assert got.groups.shape == (3, min(shard_budget(sel.budgets[i][2], balance), per_shard) * balance)
                assert (n >= sel.attn_floor(i)).all() and (n < units).any()
    # a mean of 7 of 8 heads on 2 shards: the fixed rule's ceil(7 / 2) = 4 per shard would be every head, but the
    # adaptive floor (3, so 2 per shard) is not: the layers stay sparse, and the benchmark reports the mean
    sel = router_selector(bundle, 7 / units, select_impl="xla", balance=2, adaptive=True)
    layers = [i for i, w in enumerate(sel.attn_w) if w is not None]
    assert [sel.attn_kept(i) for i in layers] == [units] * len(layers)
    assert heads_kept(sel) == [7] * len(layers)
    assert all(sel.attention(i, x, live) is not None for i in layers)


def test_bad_tensor_parallel_settings_give_clear_errors(opt_default):
    model, bundle = opt_default
    with pytest.raises(InputError, match="head_topk"):
        polar_jax.generate(model, [[1, 2]], 2, head_topk="local")
    with pytest.raises(InputError, match="balance"):
        router_selector(bundle, 0.5, balance=3)  # 8 heads do not split 3 ways
    with pytest.raises(InputError, match="devices"):
        make_mesh(tensor=2)  # one CPU device here
    with pytest.raises(InputError, match="devices"):
        make_mesh(tensor=1, data=2)


@pytest.mark.parametrize("layout", ["rn", "nr"])
def test_the_mlp_routers_second_matrix_is_split_by_neurons_in_either_layout(opt_default, layout, monkeypatch):
    """Under tensor parallelism each shard scores its own neurons: the second MLP router matrix is split
    along N, its columns when stored [rank, N], its rows when stored neuron-major [N, rank]."""
    from jax.sharding import PartitionSpec as P

    from polar_jax import tensor_parallel as tp
    from polar_jax.routers import router_selector, sparsify

    monkeypatch.setattr(sparsify, "MLP_ROUTER_LAYOUT", layout)
    _, bundle = opt_default
    sel = router_selector(bundle, 0.5, 0.99)
    specs = tp.selector_specs(sel)
    want = P(None, tp.TENSOR) if layout == "rn" else P(tp.TENSOR, None)
    assert [s for s in specs.mlp_b if s is not None] == [want] * sum(b is not None for b in sel.mlp_b) != []


def test_shard_imbalance_is_the_slowest_shard_over_the_mean():
    from polar_jax.tensor_parallel import shard_imbalance

    keep = np.zeros((2, 3, 8), bool)  # 2 batches of 3 rows, 8 units on 2 shards
    keep[0, :, :2] = True  # batch 0: every row on shard 0 -> loads (6, 0)
    keep[1, 0, [0, 4]] = keep[1, 1, [1, 5]] = keep[1, 2, [2, 6]] = True  # batch 1: even -> (3, 3)
    np.testing.assert_allclose(shard_imbalance(keep, 2), [2.0, 1.0])
    np.testing.assert_allclose(shard_imbalance(keep, 4), [4.0, 4 / 3])  # loads (6,0,0,0) and (2,1,2,1)
    with pytest.raises(ValueError):
        shard_imbalance(keep, 3)
