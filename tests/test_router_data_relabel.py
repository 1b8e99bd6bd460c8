"""Router data derived from a per-head collection (benchmarks/accuracy): KV-group labels from one dense pass
equal a direct group collection's; o_proj-gain weighted labels are the head norms times the gains."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO, SHARED, load_cached, require
from polar_jax.routers.collect import CollectedData, collect

sys.path.insert(0, str(REPO / "benchmarks" / "accuracy"))
import group_data_from_heads  # noqa: E402
import wo_weighted_data  # noqa: E402

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
KW = dict(seq_len=32, batch_size=4, max_tokens=32 * 4, chunk_tokens=64, progress=False)


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    model, tok = load_cached("tiny-llama")
    assert model.config.num_kv_heads < model.config.num_heads  # a GQA model: groups differ from heads
    root = tmp_path_factory.mktemp("relabel")
    heads = collect(model, tok, [require(VALID)], root / "heads", unit="head", **KW)
    groups = collect(model, tok, [require(VALID)], root / "groups", **KW)
    return model, root, CollectedData(heads), CollectedData(groups)


def test_group_labels_from_heads_equal_a_group_collection(collections):
    model, root, heads, groups = collections
    group_data_from_heads.derive(heads.path, root / "derived", model.config.num_kv_heads)
    derived = CollectedData(root / "derived")
    assert (derived.meta["unit"], derived.meta["units"]) == ("group", model.config.num_kv_heads)
    assert derived.meta["derived_from"] == str(heads.path)
    for layer in range(model.config.num_layers):
        np.testing.assert_allclose(derived.field("unit_norm", layer), groups.field("unit_norm", layer),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(derived.field("router_input", layer), heads.field("router_input", layer))
    with pytest.raises(FileExistsError):  # never writes over an earlier derivation
        group_data_from_heads.derive(heads.path, root / "derived", model.config.num_kv_heads)
    with pytest.raises(SystemExit, match="not a per-head collection"):
        group_data_from_heads.derive(groups.path, root / "again", model.config.num_kv_heads)


def test_gain_weighted_labels_scale_each_head(collections):
    model, root, heads, groups = collections
    cfg = model.config
    gains = wo_weighted_data.head_gains(model)
    assert gains.shape == (cfg.num_layers, cfg.num_heads) and np.ptp(gains) > 0
    wo_weighted_data.derive(heads.path, root / "wo", gains, None)
    weighted = CollectedData(root / "wo")
    assert weighted.meta["unit"] == "head" and "o_proj gain" in weighted.meta["label_weight"]
    for layer in range(cfg.num_layers):
        np.testing.assert_allclose(weighted.field("unit_norm", layer),
                                   heads.field("unit_norm", layer) * gains[layer], rtol=1e-6)
    # unit gains summed per group are the plain group labels
    wo_weighted_data.derive(heads.path, root / "wo_groups", np.ones_like(gains), cfg.num_kv_heads)
    summed = CollectedData(root / "wo_groups")
    assert (summed.meta["unit"], summed.meta["units"]) == ("group", cfg.num_kv_heads)
    for layer in range(cfg.num_layers):
        np.testing.assert_allclose(summed.field("unit_norm", layer), groups.field("unit_norm", layer),
                                   rtol=1e-5, atol=1e-6)
