"""Collection on the real shared checkpoints: stored statistics equal a direct forward pass; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED, load_cached, require
from polar_jax.errors import InputError, PolarError
from polar_jax.models.collect import forward_with_stats, group_norms
from polar_jax.routers.bundle import ModelMismatchError
from polar_jax.routers.collect import CollectedData, collect, make_collect_windows, read_text_tokens

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"


@pytest.mark.parametrize("name", ["polar-tiny-opt", "tiny-llama"])
def test_collected_data_matches_direct_forward(tmp_path, name):
    model, tok = load_cached(name)
    out = collect(model, tok, [require(VALID)], tmp_path / "d", seq_len=32, batch_size=3, max_tokens=32 * 7,
                  chunk_tokens=64, progress=False)
    data = CollectedData(out)
    assert data.num_tokens == 32 * 7 and len(data.meta["chunks"]) == 3  # 3+3+1 windows, chunked per batch
    windows = make_collect_windows(read_text_tokens(tok, [VALID], 32 * 7), 32)
    np.testing.assert_array_equal(data.field("tokens"), windows.reshape(-1))
    _, stats = forward_with_stats(model, windows)
    cfg = model.config
    for layer in range(cfg.num_layers):
        ri = np.asarray(stats["router_input"][layer]).reshape(-1, cfg.hidden_size)
        np.testing.assert_allclose(data.field("router_input", layer), ri, rtol=2e-3, atol=2e-3)  # stored fp16
        norms = stats["head_norm"][layer]
        if cfg.num_kv_heads < cfg.num_heads:
            norms = group_norms(norms, cfg.num_kv_heads)
        got = data.field("unit_norm", layer)
        assert got.shape[-1] == data.meta["units"]
        np.testing.assert_allclose(got, np.asarray(norms).reshape(len(got), -1), rtol=1e-5, atol=1e-6)
        if cfg.relu_mlp:
            act = np.asarray(stats["mlp_active"][layer]).reshape(len(got), -1)
            np.testing.assert_array_equal(data.field("mlp_active", layer), act)
    if not cfg.relu_mlp:
        with pytest.raises(InputError, match="not ReLU"):
            data.field("mlp_active", 1)


def test_collect_refuses_overwrite_and_other_models(tmp_path):
    model, tok = load_cached("polar-tiny-opt")
    kw = dict(seq_len=16, batch_size=4, max_tokens=64, progress=False)
    out = collect(model, tok, [VALID], tmp_path / "d", **kw)
    with pytest.raises(PolarError, match="overwrite"):
        collect(model, tok, [VALID], out, **kw)
    (out / "notes.txt").write_text("keep me")
    collect(model, tok, [VALID], out, overwrite=True, **kw)
    assert (out / "notes.txt").read_text() == "keep me"  # overwrite removes only collection files
    CollectedData(out).check_model(model)
    other, _ = load_cached("tiny-opt")
    with pytest.raises(ModelMismatchError, match="another model"):
        CollectedData(out).check_model(other)
    meta = json.loads((out / "collect.json").read_text())
    meta["complete"] = False
    (out / "collect.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="incomplete"):
        CollectedData(out)


def test_collect_bad_input_gives_clear_errors(tmp_path):
    model, tok = load_cached("polar-tiny-opt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("A few words only .")
    with pytest.raises(InputError, match="is empty"):
        collect(model, tok, [empty], tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="fewer than one window"):
        collect(model, tok, [short], tmp_path / "b", seq_len=256, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        collect(model, tok, [tmp_path / "missing.txt"], tmp_path / "c", progress=False)
    with pytest.raises(InputError, match="not a collection folder"):
        CollectedData(tmp_path / "nowhere")
    assert not (tmp_path / "b").exists()  # nothing written when the input is refused


def test_group_score_is_the_sum_of_its_heads_norms():
    """A KV group's score (router labels and the oracle) is the sum of its query heads' output norms: the
    scoring the issue's HF oracle used. The L2 norm of the concatenated outputs ranks these groups the
    other way round: one strong head (group 1) against three middling ones (group 0)."""
    heads = np.asarray([[1.0, 1.0, 1.0, 1.8, 0.05, 0.05]], np.float32)  # [T, Hq = 6], 2 groups of 3
    score = np.asarray(group_norms(heads, 2))
    np.testing.assert_allclose(score, [[3.0, 1.9]], rtol=1e-6)
    l2 = np.sqrt(np.sum(np.square(np.asarray(heads).reshape(1, 2, 3)), -1))
    assert score[0, 0] > score[0, 1] and l2[0, 0] < l2[0, 1]
