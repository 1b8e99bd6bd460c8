"""Sparsity bundle: round trip, model identity, the committed default bundle, density checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import polar_jax
from conftest import load_cached
from hf_factory import TINY_OPT, write_hf
from polar_jax.checkpoint import model_signature
from polar_jax.errors import CheckpointError, InputError, PolarError
from polar_jax.routers import (
    MLPTable, ModelMismatchError, SparsityBundle, SparsityConfig, load_bundle, load_sparsity, router_sparsifier,
)


def random_bundle(model, seed: int = 0, rank: int = 8, k: int = 64) -> SparsityBundle:
    """A bundle with random router weights for `model` (MLP tables give k neurons at every batch size)."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    units = cfg.num_kv_heads if cfg.num_kv_heads < cfg.num_heads else cfg.num_heads
    d, n, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    params = {}
    for i in range(1, L):
        params[f"attn.{i}.w"] = rng.normal(size=(d, units)).astype(np.float32)
        params[f"attn.{i}.b"] = rng.normal(size=(units,)).astype(np.float32)
        if cfg.relu_mlp:
            params[f"mlp.{i}.a"] = rng.normal(size=(d, rank)).astype(np.float32)
            params[f"mlp.{i}.b"] = rng.normal(size=(rank, n)).astype(np.float32)
    tables = (MLPTable(0.99, (1, 4, 16), tuple((n, n, n) if i == 0 else (k, k + 32, k + 64) for i in range(L))),)
    sc = SparsityConfig(num_layers=L, attn_units=units, unit="group" if units < cfg.num_heads else "head", ffn=n,
                        mlp_router=cfg.relu_mlp, mlp_rank=rank if cfg.relu_mlp else 0, mlp_tables=tables if cfg.relu_mlp else (),
                        attn_importance=tuple(tuple(np.linspace(0, 1, units + 1)) for _ in range(L)))
    return SparsityBundle(sc, params, model_signature(model))


def test_bundle_round_trip(tmp_path):
    model, _ = load_cached("polar-tiny-opt")
    b = random_bundle(model)
    b.save(tmp_path / "b")
    with pytest.raises(PolarError, match="overwrite"):
        b.save(tmp_path / "b")
    got = load_sparsity(tmp_path / "b", model)
    assert got.config == b.config
    assert set(got.params) == set(b.params)
    for k, v in b.params.items():
        np.testing.assert_array_equal(got.params[k], v)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["routers.safetensors", "sparsity.json"]


def test_mismatched_bundle_is_refused(tmp_path):
    model, _ = load_cached("polar-tiny-opt")
    random_bundle(model).save(tmp_path / "b")
    other, _ = load_cached("tiny-opt")
    with pytest.raises(ModelMismatchError, match="another model"):
        load_sparsity(tmp_path / "b", other)
    with pytest.raises(ModelMismatchError):
        load_sparsity("default", other)


def test_same_architecture_different_weights_is_refused(tmp_path):
    """Two checkpoints with one config and different weights: the architecture hash matches, the weight
    probe must not. The same weights in another dtype are the same model and are accepted."""
    a, _ = polar_jax.load_hf(write_hf(tmp_path / "a", TINY_OPT, seed=1))
    b, _ = polar_jax.load_hf(write_hf(tmp_path / "b", TINY_OPT, seed=2))
    assert model_signature(a)["arch_hash"] == model_signature(b)["arch_hash"]
    random_bundle(a).save(tmp_path / "bundle")
    with pytest.raises(ModelMismatchError, match="same architecture but different weights"):
        load_sparsity(tmp_path / "bundle", b)
    assert load_sparsity(tmp_path / "bundle", a).signature == model_signature(a)
    half, _ = polar_jax.load_hf(tmp_path / "a", dtype="bfloat16")
    load_sparsity(tmp_path / "bundle", half)
    # A change to one probed tensor alone is enough.
    c, _ = polar_jax.load_hf(write_hf(tmp_path / "c", TINY_OPT, seed=1))
    c.layers[1].mlp.up[...] = c.layers[1].mlp.up[...] * 1.5
    with pytest.raises(ModelMismatchError, match="different weights"):
        load_sparsity(tmp_path / "bundle", c)


def test_default_bundle_matches_default_model():
    model, _ = polar_jax.load("default")
    b = polar_jax.load_sparsity("default", model)
    assert b.config.mlp_router and b.config.mlp_tables and b.config.attn_importance is not None
    assert b.config.train["texts"] and all("test" not in t["path"] for t in b.config.train["texts"])
    assert b.attn(0) is None and b.attn(1) is not None


def test_missing_or_damaged_bundle_files(tmp_path):
    model, _ = load_cached("polar-tiny-opt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_bundle(tmp_path / "nothing")
    random_bundle(model).save(tmp_path / "b")
    (tmp_path / "b" / "routers.safetensors").unlink()
    with pytest.raises(CheckpointError, match="routers.safetensors is missing"):
        load_bundle(tmp_path / "b")
    b = random_bundle(model)
    b.params.pop("attn.2.w")
    b.save(tmp_path / "c")
    with pytest.raises(CheckpointError, match="layer 2"):
        load_bundle(tmp_path / "c")


@pytest.mark.parametrize("bad", [0.0, 1.01, -0.5])
def test_density_outside_unit_interval_refused_by_builders(bad):
    model, _ = load_cached("polar-tiny-opt")
    b = random_bundle(model)
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        router_sparsifier(b, attn_density=bad)
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        router_sparsifier(b, attn_density=0.5, mlp_recall=bad)
    with pytest.raises(InputError, match="no MLP table for recall 0.9"):
        router_sparsifier(b, attn_density=0.5, mlp_recall=0.9)
    assert router_sparsifier(dataclasses.replace(b), attn_density=0.5).attn_k == (8, 4, 4, 4)
