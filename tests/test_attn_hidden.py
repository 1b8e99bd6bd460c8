"""Hidden-layer attention routers (config `attn_hidden` h > 0): bundle format (round trip, version, shape
checks), linear bundles unchanged, the masked-evaluation and decode paths computing the same logits as
NumPy, training on a problem a linear router cannot solve, and the `--attn-hidden` flag."""

from __future__ import annotations

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import polar_jax
from conftest import load_cached, model_dir, require
from polar_jax.cli import main
from polar_jax.errors import CheckpointError, InputError
from polar_jax.routers import SparsityConfig, load_bundle, load_sparsity, router_selector, router_sparsifier
from polar_jax.routers.bundle import HIDDEN_VERSION, LINEAR_VERSION, VERSION
from polar_jax.routers.collect import CollectedData
from polar_jax.routers.train import TrainOptions, train_attention_router, train_routers
from test_cli_routers import VALID
from test_routers_bundle import random_bundle
from test_sparse_eval import _decode_path_logits, _tokens


def hidden_bundle(model, hidden: int, seed: int = 0):
    """`random_bundle` with hidden-layer attention routers of width `hidden` (w1 [d, h], b1 [h], w [h, U])."""
    b = random_bundle(model, seed)
    rng = np.random.default_rng(seed + 100)
    d, units = model.config.hidden_size, b.config.attn_units
    for i in range(1, model.config.num_layers):
        b.params[f"attn.{i}.w1"] = (rng.normal(size=(d, hidden)) / np.sqrt(d)).astype(np.float32)
        b.params[f"attn.{i}.b1"] = rng.normal(size=(hidden,)).astype(np.float32)
        b.params[f"attn.{i}.w"] = rng.normal(size=(hidden, units)).astype(np.float32)
    return dataclasses.replace(b, config=dataclasses.replace(b.config, attn_hidden=hidden))


def numpy_logits(bundle, layer: int, x: np.ndarray) -> np.ndarray:
    """Reference: relu(x @ w1 + b1) @ w + b (hidden) or x @ w + b (linear), in float64."""
    p = {k.split(".")[-1]: v.astype(np.float64) for k, v in bundle.params.items() if k.startswith(f"attn.{layer}.")}
    x = x.astype(np.float64)
    if "w1" in p:
        x = np.maximum(x @ p["w1"] + p["b1"], 0.0)
    return x @ p["w"] + p["b"]


def _meta(path):
    return json.loads((path / "sparsity.json").read_text())


def test_hidden_bundle_round_trip(tmp_path):
    model, _ = load_cached("tiny-llama")
    b = hidden_bundle(model, 24)
    b.save(tmp_path / "b")
    meta = _meta(tmp_path / "b")
    assert meta["version"] == HIDDEN_VERSION == 2 and meta["config"]["attn_hidden"] == 24
    got = load_sparsity(tmp_path / "b", model)
    assert got.config == b.config
    assert set(got.params) == set(b.params)
    for k, v in b.params.items():
        np.testing.assert_array_equal(got.params[k], v)
    assert len(got.attn(1)) == 4 and got.attn(0) is None
    x = np.random.default_rng(1).normal(size=(5, model.config.hidden_size)).astype(np.float32)
    for layer in (1, model.config.num_layers - 1):
        np.testing.assert_allclose(got.attn_logits(layer, x), numpy_logits(b, layer, x), rtol=1e-5, atol=1e-5)


def test_linear_bundles_keep_their_format_and_logits(tmp_path):
    """A linear bundle is written exactly as before (version 1, no attn_hidden field, which older readers
    would refuse); the committed default bundle (linear, written before hidden layers existed) loads and
    gives x @ w + b on every path."""
    model, _ = load_cached("tiny-llama")
    random_bundle(model).save(tmp_path / "lin")
    meta = _meta(tmp_path / "lin")
    assert meta["version"] == LINEAR_VERSION == 1 and "attn_hidden" not in meta["config"]
    assert load_bundle(tmp_path / "lin").config.attn_hidden == 0

    opt, _ = polar_jax.load("default")
    old = load_sparsity("default", opt)
    assert old.config.attn_hidden == 0 and len(old.attn(1)) == 2
    x = np.random.default_rng(2).normal(size=(3, 7, opt.config.hidden_size)).astype(np.float32)
    sp = router_sparsifier(old, 0.5, 0.99)
    for layer in range(1, opt.config.num_layers):
        w, b = old.attn(layer)
        want = x @ w + b
        np.testing.assert_allclose(old.attn_logits(layer, x), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(sp._attn_logits(layer, x)), want, rtol=1e-5, atol=1e-5)


def _save_tensors(path, params):
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(path / "routers.safetensors"))


def test_malformed_hidden_bundles_are_refused(tmp_path):
    model, _ = load_cached("llama31-gqa")
    d = model.config.hidden_size
    hidden_bundle(model, 16).save(tmp_path / "good")
    good = load_file(str(tmp_path / "good" / "routers.safetensors"))

    def variant(name, params=None, meta_change=None):
        p = tmp_path / name
        p.mkdir()
        meta = _meta(tmp_path / "good")
        if meta_change:
            meta_change(meta)
        (p / "sparsity.json").write_text(json.dumps(meta))
        _save_tensors(p, good if params is None else params)
        return p

    cases = [
        (variant("no_w1", {k: v for k, v in good.items() if k != "attn.1.w1"}), r"layer 1 is missing attn\.1\.w1"),
        (variant("no_b1", {k: v for k, v in good.items() if k != "attn.1.b1"}), r"layer 1 is missing attn\.1\.b1"),
        # w of a linear router [d, U] where the hidden layer's [h, U] belongs
        (variant("linear_w", {**good, "attn.1.w": np.zeros((d, 2), np.float32)}), r"attn\.1\.w is \[64, 2\].*\[16, 2\]"),
        (variant("bad_w1", {**good, "attn.1.w1": np.zeros((d, 15), np.float32)}), r"layer 1 is mis-shaped: attn\.1\.w1"),
        (variant("bad_in", {**good, "attn.1.w1": np.zeros((d + 1, 16), np.float32)}), r"attn\.1\.w1 is \[65, 16\]"),
        (variant("bad_b1", {**good, "attn.1.b1": np.zeros((16, 1), np.float32)}), r"attn\.1\.b1 is \[16, 1\]"),
        # hidden tensors in a bundle whose config says linear: never silently ignored
        (variant("says_linear", meta_change=lambda m: (m["config"].pop("attn_hidden"), m.update(version=1))),
         r"mis-shaped|hidden-layer tensors"),
        (variant("v1_hidden", meta_change=lambda m: m.update(version=1)), "need format version 2"),
        (variant("negative", meta_change=lambda m: m["config"].update(attn_hidden=-4)), "attn_hidden"),
        (variant("future", meta_change=lambda m: m.update(version=VERSION + 1)), "not one this polar-jax reads"),
    ]
    # the shapes above: d 64, 2 KV groups, 2 layers (layer 1 the only sparse one)
    assert (model.config.hidden_size, random_bundle(model).config.attn_units, model.config.num_layers) == (64, 2, 2)
    for path, msg in cases:
        try:
            load_bundle(path)
        except CheckpointError as e:
            assert re.search(msg, str(e)), (path.name, str(e))
        else:
            pytest.fail(f"{path.name}: a malformed bundle loaded without an error")
    # a linear bundle carrying stray hidden-layer tensors (right shapes otherwise) is refused too
    lin = random_bundle(model)
    lin.params["attn.1.w1"], lin.params["attn.1.b1"] = np.zeros((d, 4), np.float32), np.zeros(4, np.float32)
    lin.save(tmp_path / "stray")
    with pytest.raises(CheckpointError, match=r"hidden-layer tensors \(attn\.1\.w1/b1\)"):
        load_bundle(tmp_path / "stray")


def _top_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Per row, the k best units in score order (ties to the lower index)."""
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


def test_decode_and_masked_paths_select_from_the_hidden_layer_logits():
    """The selector (decode path) and the sparsifier (masked evaluation) choose what NumPy's logits choose.
    The hidden width equals d, so code that skipped the hidden layer (x @ w + b with w [h, U]) would run
    and pick other units instead of failing on a shape."""
    model, _ = load_cached("tiny-llama")
    cfg = model.config
    b = hidden_bundle(model, cfg.hidden_size, seed=3)
    units = b.config.attn_units
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, cfg.hidden_size)).astype(np.float32)
    skipped_differs = False
    for k in range(1, units):
        rho = k / units + 1e-9
        sel, sp = router_selector(b, rho, None), router_sparsifier(b, rho, None)
        for layer in range(1, cfg.num_layers):
            ref = numpy_logits(b, layer, x)
            a = sel.attention(layer, x, np.ones(len(x), bool))
            np.testing.assert_array_equal(np.asarray(a.groups), _top_ids(ref, k))
            np.testing.assert_array_equal(np.asarray(a.n_active), np.full(len(x), k))
            mask = np.asarray(sp.heads_mask(layer, x[None], None))[0]
            want = np.zeros_like(ref)
            np.put_along_axis(want, _top_ids(ref, k), 1.0, axis=-1)
            np.testing.assert_array_equal(mask, want)
            skipped = x @ b.params[f"attn.{layer}.w"] + b.params[f"attn.{layer}.b"]
            skipped_differs |= not np.array_equal(_top_ids(skipped, k), _top_ids(ref, k))
    assert skipped_differs  # the test can tell the hidden layer from its absence


def test_masked_evaluation_equals_decode_path_with_hidden_routers():
    model, _ = load_cached("tiny-llama")
    b = hidden_bundle(model, 32, seed=6)
    toks = _tokens(model, 3, 14, seed=7)
    p = 5
    masked = model(toks, sparsifier=router_sparsifier(b, 0.5, None, start=p))[:, p - 1 : -1]
    decoded = _decode_path_logits(model, toks, p, router_selector(b, 0.5, None))
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(masked), rtol=2e-4, atol=2e-4)


def test_hidden_router_learns_what_a_linear_router_cannot():
    """Unit j's output norm is |x_j|: the top-2 of 4 units by |x_j| is a symmetric function of x, so a
    linear router is at chance (k/U = 0.5) while one hidden ReLU layer can represent |x_j| exactly."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 16)).astype(np.float32)
    norms = np.abs(x[:, :4]) + 0.05 * rng.random((6000, 4)).astype(np.float32)
    xt, nt, xv, nv = x[:5000], norms[:5000], x[5000:], norms[5000:]
    opts = TrainOptions(epochs=25, lr=3e-3, batch_size=256, patience=5, seed=0)
    quiet = dict(log=lambda s: None, progress=False)
    _, lin = train_attention_router(xt, nt, xv, nv, 2, opts, hidden=0, **quiet)
    router, hid = train_attention_router(xt, nt, xv, nv, 2, opts, hidden=32, **quiet)
    assert lin["best_val_recall"] < 0.65
    assert hid["best_val_recall"] > 0.9
    assert router.arrays()[0].shape == (32, 4) and router.arrays()[2].shape == (16, 32)


def test_train_routers_and_cli_attn_hidden(tmp_path, capsys):
    """train_routers stores the hidden layer (and the config field); the flag refuses bad widths."""
    data = tmp_path / "data"
    assert main(["collect", "--model", str(model_dir("tiny-llama")), "--text", str(require(VALID)), "--out", str(data),
                 "--seq-len", "32", "--max-tokens", "1280", "--batch-size", "8"]) == 0
    assert main(["train-routers", "--data", str(data), "--out", str(tmp_path / "b"), "--attn-hidden", "8",
                 "--epochs", "1", "--batch-size", "128", "--val-fraction", "0.2"]) == 0
    b = load_bundle(tmp_path / "b")
    assert b.config.attn_hidden == 8 and b.params["attn.1.w1"].shape == (512, 8) and b.params["attn.1.w"].shape == (8, 4)
    for bad in ("-1", "2.5", "x"):
        capsys.readouterr()
        code = main(["train-routers", "--data", str(data), "--out", str(tmp_path / "c"), "--attn-hidden", bad])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "attn_hidden must be an integer >= 0" in err, err
        assert not (tmp_path / "c").exists()
    with pytest.raises(InputError, match="hidden width"):
        train_routers(CollectedData(data), attn_hidden=-2, progress=False)
    assert SparsityConfig.from_dict({**b.config.to_dict(), "attn_hidden": 0}).attn_hidden == 0


def test_hidden_head_routers_are_never_fused_with_the_mlp_router():
    """fuse_routers concatenates the head router's first matrix with the MLP router's: only a linear head
    router has one of the right shape, so a hidden-layer bundle keeps them apart and still selects from
    its own logits."""
    model, _ = load_cached("tiny-opt")
    b = hidden_bundle(model, 6)
    assert b.config.mlp_router
    sel = router_selector(b, 0.5, 0.99, fuse_routers=True)
    assert not sel.fused_first
    x = np.random.default_rng(3).standard_normal((1, model.config.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(sel._attn_logits(1, jnp.asarray(x))), numpy_logits(b, 1, x), rtol=1e-4,
                               atol=1e-4)
    assert router_selector(random_bundle(model, 0), 0.5, 0.99, fuse_routers=True).fused_first
