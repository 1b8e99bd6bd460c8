"""Several attention-router sets in one sparsity bundle, each trained at one density (format version 3):
which set serves a density (config.ATTN_SET_RULE, "nearest_k"), the sparsifier / decode selector / oracle
using that set, calibration per set, training several densities (API and `train-routers
--attn-train-density A B`), the round trip, single-set bundles keeping their format, and the errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, load_cached, model_dir, require
from polar_jax.cli import main
from polar_jax.errors import CheckpointError, InputError
from polar_jax.routers import SparsityConfig, load_bundle, load_sparsity, router_selector, router_sparsifier
from polar_jax.routers.bundle import LINEAR_VERSION, SETS_VERSION, merge_attention_sets
from polar_jax.routers.calibrate import calibrate
from polar_jax.routers.collect import CollectedData
from polar_jax.routers.config import ATTN_SET_RULE, check_train_densities, nearest_attn_set, units_kept
from polar_jax.routers.train import TrainOptions, train_routers
from test_attn_hidden import hidden_bundle, numpy_logits
from test_cli_routers import VALID
from test_routers_bundle import random_bundle

QUIET = dict(log=lambda s: None, progress=False)


def _trained_at(bundle, rho: float, seed: int):
    """`bundle` with fresh random attention routers, marked as trained at density rho."""
    other = random_bundle_like(bundle, seed)
    return dataclasses.replace(other, config=dataclasses.replace(other.config, attn_train_density=rho,
                                                                 attn_density=rho))


def random_bundle_like(bundle, seed: int):
    rng = np.random.default_rng(seed)
    params = {k: (rng.normal(size=v.shape).astype(np.float32) if k.startswith("attn.") else v)
              for k, v in bundle.params.items()}
    return dataclasses.replace(bundle, params=params)


def _sets_bundle(model, densities, seed: int = 0):
    base = random_bundle(model, seed)
    return merge_attention_sets([_trained_at(base, d, seed + 10 + i) for i, d in enumerate(densities)])


def test_nearest_k_rule():
    """The set trained at the k served wins; otherwise the nearest k, then the nearer density, then the denser."""
    cases = [  # (training densities, rho, units, expected set)
        ((0.34, 0.67), 1 / 3, 3, 0), ((0.34, 0.67), 2 / 3 + 1e-9, 3, 1), ((0.34, 0.67), 1.0, 3, 1),
        ((0.34, 0.67), 0.6, 3, 0),  # 0.6 keeps floor(1.8) = 1 group: the top-1 set, though 0.67 is nearer
        ((0.45, 0.67), 5 / 9 + 1e-9, 9, 0),  # k 4 and 6 tie around k 5; densities 0.106 vs 0.114 away
        ((0.45, 0.6, 0.67), 5 / 9 + 1e-9, 9, 1),  # 0.6 keeps 5 of 9 exactly
        ((0.25, 0.75), 0.5, 4, 1),  # k 1 and 3 tie around 2, densities tie: the denser set
        ((0.5,), 0.1, 4, 0),
    ]
    for dens, rho, units, want in cases:
        assert nearest_attn_set(dens, rho, units) == want, (dens, rho, units)
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        nearest_attn_set((0.5,), 0.0, 4)


@pytest.mark.parametrize("arch", ["polar-tiny-opt", "tiny-llama"])
def test_selector_and_sparsifier_use_the_set_nearest_the_density(arch):
    """At every k, the decode selector and the masked sparsifier of a 3-set bundle pick exactly what the
    single-set bundle of the set nearest k picks, and their logits are that set's (the sets are random and
    differ, so the wrong set picks other units)."""
    model, _ = load_cached(arch)
    units = random_bundle(model).config.attn_units
    dens = (1 / units, 0.5, (units - 1) / units)  # k = 1, U/2, U-1
    b = _sets_bundle(model, dens, seed=1)
    assert b.config.attn_set_rule == ATTN_SET_RULE and b.num_attn_sets == 3
    x = np.random.default_rng(2).normal(size=(12, model.config.hidden_size)).astype(np.float32)
    other_differs = False
    for k in range(1, units):
        rho = k / units + 1e-9
        want = nearest_attn_set(dens, rho, units)
        assert want == {1: 0, units // 2: 1, units - 1: 2}.get(k, want)  # a set trained at the k served wins
        single = b.attention_set(want)
        assert single.config.attn_train_density == dens[want] and not single.config.attn_sets
        sel, sp = router_selector(b, rho, None, mlp=False), router_sparsifier(b, rho, None, mlp=False)
        for layer in range(1, model.config.num_layers):
            ref = numpy_logits(single, layer, x)
            np.testing.assert_allclose(np.asarray(sel._attn_logits(layer, x)), ref, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.asarray(sp._attn_logits(layer, x)), ref, rtol=1e-4, atol=1e-4)
            top = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
            np.testing.assert_array_equal(np.sort(np.asarray(sel.attention(layer, x, np.ones(12, bool)).groups)),
                                          np.sort(top))
            for j in range(3):
                if j != want:
                    other = np.argsort(-numpy_logits(b.attention_set(j), layer, x), axis=-1, kind="stable")[:, :k]
                    other_differs |= not np.array_equal(np.sort(other), np.sort(top))
    assert other_differs  # the test can tell one set from another
    # the bundle's default density (the first set's) picks the first set
    np.testing.assert_allclose(np.asarray(router_selector(b, None, None, mlp=False)._attn_logits(1, x)),
                               numpy_logits(b.attention_set(0), 1, x), rtol=1e-4, atol=1e-4)


def test_multi_set_bundle_round_trip_and_format(tmp_path):
    model, _ = load_cached("polar-tiny-opt")
    b = _sets_bundle(model, (0.25, 0.75), seed=3)
    b.save(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "sparsity.json").read_text())
    assert meta["version"] == SETS_VERSION == 3
    assert meta["config"]["attn_set_rule"] == "nearest_k"
    assert [s["train_density"] for s in meta["config"]["attn_sets"]] == [0.25, 0.75]
    got = load_sparsity(tmp_path / "b", model)
    assert got.config == b.config and set(got.params) == set(b.params)
    assert {k.split(".")[0] for k in got.params} == {"attn_set0", "attn_set1", "mlp"}
    for k, v in b.params.items():
        np.testing.assert_array_equal(got.params[k], v)
    with pytest.raises(InputError, match="holds 2 attention-router sets"):
        got.attn(1)
    with pytest.raises(InputError, match="does not exist"):
        got.attention_set(2)


def test_single_set_bundles_keep_their_format(tmp_path):
    """A single-set bundle is written exactly as before (version 1/2, no attn_sets fields), the committed
    bundles load and re-save byte for byte, and each serves every density from its one set."""
    model, _ = load_cached("polar-tiny-opt")
    random_bundle(model).save(tmp_path / "lin")
    meta = json.loads((tmp_path / "lin" / "sparsity.json").read_text())
    assert meta["version"] == LINEAR_VERSION and "attn_sets" not in meta["config"]
    assert "attn_set_rule" not in meta["config"]
    for path in (REPO / "polar_jax" / "default_sparsity", REPO / "benchmarks/results/sparsity_smollm2_heads",
                 REPO / "benchmarks/results/sparsity_smollm2_groups"):
        b = load_bundle(require(path))
        assert b.num_attn_sets == 1 and b.for_density(0.3) is b and b.attention_set(0) is b
        b.save(tmp_path / path.name)
        assert (tmp_path / path.name / "sparsity.json").read_text() == (path / "sparsity.json").read_text()


def test_calibrate_measures_each_set_with_its_own_logits():
    """Calibrating a 2-set bundle stores, per set, what calibrating that set alone stores; per-layer and
    adaptive budgets then come from the set serving the density."""
    model, _ = load_cached("tiny-llama")
    data = CollectedData(_collect_tiny(model_dir("tiny-llama")))
    b = train_routers(data, attn_train_density=[0.25, 0.75], opts=TrainOptions(epochs=1, batch_size=128),
                      val_fraction=0.2, **QUIET)
    cal = calibrate(b, data, recalls=(0.99,), n_batches=4, **QUIET)
    for j in range(2):
        alone = calibrate(b.attention_set(j), data, recalls=(0.99,), n_batches=4, **QUIET)
        assert cal.config.attn_sets[j].importance == alone.config.attn_importance
        assert cal.config.attn_sets[j].thresholds == alone.config.attn_thresholds
        rho = b.config.attn_sets[j].train_density
        assert cal.config.attn_k(rho, per_layer=True) == alone.config.attn_k(rho, per_layer=True)
        assert cal.config.adaptive_budgets(rho) == alone.config.adaptive_budgets(rho)
    assert cal.config.attn_sets[0].importance != cal.config.attn_sets[1].importance
    re = calibrate(cal, data, recalls=(0.99,), n_batches=4, attn_density=0.75, **QUIET)
    assert re.config.attn_density == 0.75 and re.config.attn_train_density == 0.75


_COLLECTED: dict = {}


def _collect_tiny(model_path):
    if model_path not in _COLLECTED:
        import tempfile
        from pathlib import Path

        out = Path(tempfile.mkdtemp()) / "data"
        assert main(["collect", "--model", str(model_path), "--text", str(require(VALID)), "--out", str(out),
                     "--seq-len", "32", "--max-tokens", "1280", "--batch-size", "8"]) == 0
        _COLLECTED[model_path] = out
    return _COLLECTED[model_path]


def test_train_several_densities_equals_training_each(tmp_path, capsys):
    """`train-routers --attn-train-density 0.75 0.25`: one bundle with a set per density (sorted), each set
    exactly the router a single-density run trains, the first density the default, a progress bar."""
    data = _collect_tiny(model_dir("tiny-llama"))
    common = ["--data", str(data), "--epochs", "1", "--batch-size", "128", "--val-fraction", "0.2"]
    capsys.readouterr()
    assert main(["train-routers", *common, "--out", str(tmp_path / "both"), "--attn-train-density", "0.75", "0.25"]) == 0
    assert "train-routers" in capsys.readouterr().err  # the progress bar
    both = load_bundle(tmp_path / "both")
    assert both.config.attn_train_densities == (0.25, 0.75)
    assert both.config.attn_density == 0.75 and both.config.attn_train_density == 0.75
    for j, rho in enumerate((0.25, 0.75)):
        assert main(["train-routers", *common, "--out", str(tmp_path / f"s{j}"), "--attn-train-density", str(rho)]) == 0
        single = load_bundle(tmp_path / f"s{j}")
        assert single.num_attn_sets == 1 and single.config.attn_train_density == rho
        got = both.attention_set(j)
        assert set(got.params) == set(single.params)
        for k, v in single.params.items():
            np.testing.assert_array_equal(got.params[k], v)
    assert both.config.train["metrics"]["attn_set1.3"]["history"]


def test_train_density_errors(tmp_path, capsys):
    data = _collect_tiny(model_dir("tiny-llama"))
    cases = [(["0.5", "1.5"], "in (0, 1], got '1.5'"), (["0"], "in (0, 1], got '0'"), (["0.5", "0.5"], "same density"),
             (["0.5", "0.6"], "both keep 2 of 4 units"), (["x"], "attn_train_density")]
    for values, msg in cases:
        capsys.readouterr()
        code = main(["train-routers", "--data", str(data), "--out", str(tmp_path / "c"), "--attn-train-density",
                     *values])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and msg in err, (values, err)
        assert not (tmp_path / "c").exists()
    with pytest.raises(InputError, match="same density"):
        train_routers(CollectedData(data), attn_train_density=(0.25, 0.25), **QUIET)
    with pytest.raises(InputError, match="at least one"):
        check_train_densities([], 4)


def test_malformed_multi_set_bundles_are_refused(tmp_path):
    model, _ = load_cached("tiny-llama")
    good = _sets_bundle(model, (0.25, 0.5), seed=4)
    good.save(tmp_path / "good")

    def variant(name, params=None, meta_change=None):
        path = tmp_path / name
        good.save(path)
        if params is not None:
            save_file(params, str(path / "routers.safetensors"))
        if meta_change is not None:
            meta = json.loads((path / "sparsity.json").read_text())
            meta_change(meta)
            (path / "sparsity.json").write_text(json.dumps(meta))
        return path

    tensors = load_file(str(tmp_path / "good" / "routers.safetensors"))
    reshaped = dict(tensors, **{"attn_set1.2.w": np.zeros((512, 3), np.float32)})
    with pytest.raises(CheckpointError, match="sets disagree in shapes.*attn_set1.2.w"):
        load_bundle(variant("shape", reshaped))
    missing = {k: v for k, v in tensors.items() if k != "attn_set1.3.b"}
    with pytest.raises(CheckpointError, match="layer 3 in set 1 is missing attn_set1.3.b"):
        load_bundle(variant("missing", missing))
    stray = dict(tensors, **{"attn_set2.1.w": tensors["attn_set0.1.w"]})
    with pytest.raises(CheckpointError, match="belong to no attention-router set"):
        load_bundle(variant("stray", stray))
    with pytest.raises(CheckpointError, match="need format version 3"):
        load_bundle(variant("version", meta_change=lambda m: m.update(version=1)))
    with pytest.raises(CheckpointError, match="rule must be one of"):
        load_bundle(variant("rule", meta_change=lambda m: m["config"].update(attn_set_rule="farthest")))
    with pytest.raises(CheckpointError, match="sorted by training density"):
        load_bundle(variant("order", meta_change=lambda m: m["config"]["attn_sets"].reverse()))
    with pytest.raises(CheckpointError, match="is not that of the set serving"):
        load_bundle(variant("served", meta_change=lambda m: m["config"].update(attn_train_density=0.5)))
    with pytest.raises(CheckpointError, match="is not one this polar-jax reads"):
        load_bundle(variant("future", meta_change=lambda m: m.update(version=4)))
    # merging refuses bundles that cannot share one file
    base = random_bundle(model)
    with pytest.raises(InputError, match="attn_hidden differ"):
        merge_attention_sets([_trained_at(base, 0.25, 1), hidden_bundle(model, 8)])
    with pytest.raises(InputError, match="same density"):
        merge_attention_sets([_trained_at(base, 0.5, 1), _trained_at(base, 0.5, 2)])
    with pytest.raises(InputError, match="already holds several"):
        merge_attention_sets([good, _trained_at(base, 0.75, 1)])
    with pytest.raises(InputError, match="attn_set_rule is set"):
        SparsityConfig.from_dict({**base.config.to_dict(), "attn_set_rule": "nearest_k"})
    assert units_kept(0.25, 4) == 1


def test_cli_perplexity_with_a_multi_set_bundle_equals_the_chosen_set(tmp_path, capsys):
    """`eval ppl --sparsity MULTI --attn-density rho` is the perplexity of the set serving rho alone."""
    model_path = model_dir("tiny-llama")
    model, _ = load_cached("tiny-llama")
    b = _sets_bundle(model, (0.25, 0.75), seed=5)
    b.save(tmp_path / "multi")
    for j, rho in ((0, "0.25"), (1, "0.75")):
        b.attention_set(j).save(tmp_path / f"set{j}")
        outs = []
        for path in (tmp_path / "multi", tmp_path / f"set{j}"):
            capsys.readouterr()
            assert main(["eval", "ppl", "--model", str(model_path), "--text", str(require(VALID)), "--sparsity",
                         str(path), "--attn-density", rho, "--max-tokens", "256", "--seq-len", "64", "--json"]) == 0
            outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"])
        assert outs[0] == outs[1]
