"""benchmarks/accuracy/smollm2_accuracy.py: `archive` moves everything that depends on the router bundles out
of the current run (so `run --resume` recomputes it) and the report compares archived router runs with the
current ones. On a small synthetic results file; no model is run."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "accuracy"))
import smollm2_accuracy as acc  # noqa: E402


def _run(mode, unit=None, k=None, ppl=1.0):
    return {"mode": mode, "unit": unit, "k": k, "units": None if unit is None else {"head": 9, "group": 3}[unit],
            "density": None if k is None else k / {"head": 9, "group": 3}[unit], "ppl": ppl}


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(acc, "RESULTS", tmp_path)
    monkeypatch.setattr(acc, "OUT_JSON", tmp_path / "accuracy_smollm2.json")
    res = {"runs": [_run("dense", ppl=17.0), _run("oracle", "head", 6, 18.9), _run("router", "head", 6, 20.0),
                    _run("oracle", "group", 2, 21.8), _run("router", "group", 2, 24.0)],
           "recall": {"head": {"6": [0.9, 0.8]}}, "agreement": [{"unit": "group", "k": 2}],
           "train": {"head": {"tokens": 10}}, "train_best_val_recall": {"head": {"attn.1": 0.9}},
           "env": {"device": "cpu", "jax": "0", "date": "2026-11-29", "command": "x"}, "eval": {}}
    acc._save(res)
    return tmp_path


def test_archive_moves_router_results_and_keeps_dense_and_oracle(results):
    acc.archive("routers_old", "linear routers")
    res = json.loads(acc.OUT_JSON.read_text())
    assert [r["mode"] for r in res["runs"]] == ["dense", "oracle", "oracle"]
    old = res["routers_old"]
    assert old["note"] == "linear routers" and [(r["unit"], r["k"], r["ppl"]) for r in old["runs"]] == [
        ("head", 6, 20.0), ("group", 2, 24.0)]
    assert old["recall"] == {"head": {"6": [0.9, 0.8]}} and old["agreement"] == [{"unit": "group", "k": 2}]
    assert old["train"] == {"head": {"tokens": 10}} and "train" not in res and "train_best_val_recall" not in res
    assert res["recall"] == {} and res["agreement"] == []
    with pytest.raises(SystemExit, match="already"):
        acc.archive("routers_old", "again")
    with pytest.raises(SystemExit, match="no router runs"):
        acc.archive("routers_other", "nothing left")


def test_report_compares_archived_and_current_router_runs(results):
    acc.archive("routers_old", "linear routers")
    res = json.loads(acc.OUT_JSON.read_text())
    res["runs"].append(_run("router", "head", 6, 19.5))  # the new bundles' run
    acc._save(res)
    acc.report()
    md = (results / "accuracy_smollm2.md").read_text()
    # oracle 18.9; archived 20.0 (ratio 1.0582), current 19.5 (1.0317); the group point has no current run
    assert "| head | 6/9 | 18.90 | 20.00 | 1.0582 | 19.50 | 1.0317 |" in md
    assert "| group | 2/3 | 21.80 | 24.00 | 1.1009 | – | – |" in md
    assert "- `routers_old`: linear routers" in md


def test_kept_counter_measures_the_units_the_evaluation_keeps(monkeypatch):
    """smollm2_per_density.py --adaptive records the mean kept fraction: exactly k/U with fixed budgets,
    something else (input-adaptive) with adaptive ones; the mask rule is the wrapped one while it counts."""
    import numpy as np

    import polar_jax
    from conftest import SHARED, require
    from polar_jax.eval.sparse_ppl import sparse_perplexity
    from polar_jax.routers import sparsify

    monkeypatch.setattr(sparsify, "unit_mask", sparsify.unit_mask)  # undone after the test
    import smollm2_per_density as spd

    kept = spd.KeptCounter()
    model, tok = polar_jax.load("default")
    bundle = polar_jax.load_sparsity("default", model)
    text = require(SHARED / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:8000]
    ids = np.asarray(tok.encode(text), np.int32)
    means = {}
    for adaptive in (False, True):
        kept.reset()
        sparse_perplexity(model, ids, bundle, "router", 0.5, None, mlp=False, seq_len=64, batch_size=2,
                          max_tokens=256, progress=False, adaptive=adaptive)
        sparse_layers = sum(k < bundle.config.attn_units for k in bundle.config.attn_k(0.5))
        assert kept.slots == 256 * bundle.config.attn_units * sparse_layers
        means[adaptive] = kept.mean()
    assert means[False] == 0.5 and 0.25 <= means[True] <= 1.0 and means[True] != 0.5
    kept.reset()
    with pytest.raises(RuntimeError, match="no head mask"):
        kept.mean()
