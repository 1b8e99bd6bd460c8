"""benchmarks/accuracy/router_rank.py (MLP-router quality vs rank, projected to OPT-6.7B bytes): the bytes
model against hand-computed values, and the whole measurement + report path on polar-tiny-opt with the
committed default bundle and a few hundred tokens of real router data (CPU, well under 30 s)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest

from conftest import REPO, SHARED, load_cached, require
from polar_jax.routers import load_sparsity
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.collect import CollectedData, collect, read_text_tokens
from polar_jax.routers.config import MLPTable

sys.path.insert(0, str(REPO / "benchmarks" / "accuracy"))
import router_rank  # noqa: E402

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
TEST = SHARED / "data" / "wikitext-2" / "test.txt"


def test_bytes_model_against_hand_values():
    # OPT-6.7B, bf16: d 4096, ffn 16384, 32 layers, vocab 50272
    assert router_rank.router_bytes(1024) == 1024 * (4096 + 16384) * 2 == 41_943_040
    assert router_rank.mlp_bytes(0.5) == 0.5 * 2 * 4096 * 16384 * 2 == 134_217_728
    # 32 * (4 * 4096^2 + 2 * 4096 * 16384) * 2 + 50272 * 4096 * 2 (~13.3 GB, the figure issue 10 quotes)
    assert router_rank.dense_step_bytes() == 32 * 402_653_184 + 411_828_224 == 13_296_730_112
    p = router_rank.opt_projection(0.25, {"1": 0.3, "8": 0.6})
    assert p["rank"] == 1024  # r/d = 1/4 of d = 4096
    assert p["router_plus_mlp_bytes_per_layer"]["1"] == pytest.approx(41_943_040 + 0.3 * 268_435_456)
    assert p["router_plus_mlp_vs_dense_mlp"]["8"] == pytest.approx((41_943_040 + 0.6 * 268_435_456) / 268_435_456)
    # 31 sparse layers' routers (layer 0 dense) over the dense step: 1_300_234_240 / 13_296_730_112
    assert p["router_share_of_dense_step_b1"] == pytest.approx(0.0977865, rel=1e-5)
    assert router_rank.opt_projection(1 / 32, {"1": 0.0})["router_bytes_per_layer"] == 128 * 20480 * 2


@pytest.fixture(scope="module")
def polar_tiny(tmp_path_factory):
    """polar-tiny-opt, its committed default bundle (rank 128 = d/2), real router data from 40 windows of 32
    tokens (the default bundle's 10 % split keeps 4 windows = 128 held-out tokens), test-text ids."""
    model, tok = load_cached("polar-tiny-opt")
    root = tmp_path_factory.mktemp("router_rank")
    path = collect(model, tok, [require(VALID)], root / "data", seq_len=32, batch_size=8, max_tokens=32 * 40,
                   chunk_tokens=512, progress=False)
    ids = read_text_tokens(tok, [require(TEST)])[0]
    return model, load_sparsity("default", model), CollectedData(path), ids, root


def test_study_measures_the_table_and_reports(polar_tiny):
    model, bundle, data, ids, root = polar_tiny
    c = bundle.config
    batches = (1, 4)
    row = router_rank.study_bundle(bundle, data, batches=batches, model=model, ids=ids, max_tokens=128,
                                   seq_len=64, rules=("topk",), n_batches=8, log=lambda s: None)
    assert (row["rank"], row["d"], row["ffn"], row["rank_ratio"]) == (128, 256, 1024, 0.5)
    table = c.mlp_table(0.99)
    for b in batches:
        ks = [table.k_for(i, b, c.mlp_tile, c.ffn) for i in (1, 2, 3)]
        assert row["tables"]["0.99"]["k"][str(b)] == ks
        assert row["tables"]["0.99"]["density_mean"][str(b)] == pytest.approx(np.mean(ks) / 1024)
        fb = np.mean([1.0 if k / 1024 > 0.75 else k / 1024 for k in ks])
        assert row["tables"]["0.99"]["density_mean_with_fallback"][str(b)] == pytest.approx(fb)
        assert all(0.0 < v <= 1.0 for v in row["union_recall"][str(b)])
        assert math.isfinite(row["ppl"][f"topk/{b}"]["ppl"]) and row["ppl"][f"topk/{b}"]["tokens"] > 0
    # the measured bundle has no dense fallback: a bundle whose fallback would run every layer dense still
    # has its calibrated k measured (else recall and perplexity would be the dense MLP's, not the router's)
    low = SparsityBundle(dataclasses.replace(c, mlp_dense_threshold=0.01), bundle.params, bundle.signature)
    assert low.config.mlp_k(0.99, 4) == (None,) * 4
    assert router_rank.raw_table_bundle(low).config.mlp_k(0.99, 4)[1:] == tuple(row["tables"]["0.99"]["k"]["4"])

    # a table that keeps every neuron is the dense MLP: the same perplexity as dense
    full = MLPTable(0.99, (1,), tuple((c.ffn,) for _ in range(c.num_layers)))
    dense_bundle = SparsityBundle(dataclasses.replace(c, mlp_tables=(full,)), bundle.params, bundle.signature)
    same = router_rank.study_bundle(dense_bundle, data, batches=(1,), model=model, ids=ids, max_tokens=128,
                                    seq_len=64, rules=("topk",), n_batches=4, log=lambda s: None)
    dense, _ = router_rank.dense_ppl(model, ids, 128, seq_len=64)
    assert same["ppl"]["topk/1"]["ppl"] == pytest.approx(dense, rel=1e-5)
    assert same["union_recall"]["1"] == [1.0, 1.0, 1.0]

    # the report path: json (with the provenance fields), markdown and plot
    res = {"model": "polar-tiny-opt", "device": "CPU", "jax": "0.0.0", "date": "2000-01-01", "command": "test",
           "commands": ["test"], "batches": list(batches), "recall": 0.99, "layers": 4, "ranks": [row],
           "d": 256, "ffn": 1024, "dense_ppl": row["ppl"]["topk/1"]["ppl"], "ppl_tokens": 128, "seconds": 0,
           "true_union_density": router_rank.true_union_density(data, c, batches, n_batches=4)}
    stem = router_rank.write_results(res, root / "out")
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["ranks"][0]["opt67b"]["rank"] == 2048  # r/d = 1/2 -> 2048 on OPT-6.7B
    assert saved["ranks"][0]["opt67b"]["router_bytes_per_layer"] == 2048 * 20480 * 2
    assert {"device", "jax", "date", "command"} <= set(saved)
    assert "| 128 | 1/2 |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 0
