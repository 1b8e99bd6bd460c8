"""Issue 11, data safety: no writer (convert, collect, train-routers, calibrate) can replace its input or a
folder that is not its own output, and an interrupted write leaves the old output intact."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.numpy

import convert.hf as convert_hf
from cli_helpers import assert_refused, run_cli, tree_digest
from conftest import SHARED, require
from convert import convert_checkpoint
from gguf_factory import write_gguf
from hf_factory import TINY_OPT, write_hf
from polar_jax.checkpoint import DEFAULT_MODEL_DIR, load
from polar_jax.errors import PolarError
from polar_jax.outputs import OutputKind, atomic_folder, check_target
from polar_jax.routers.bundle import DEFAULT_DIR as DEFAULT_BUNDLE
from polar_jax.routers.bundle import load_bundle

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
KIND = OutputKind("test output", "marker.json", "test-format", owns=lambda name: name in ("marker.json", "data.bin"))


def _write_output(folder, payload: bytes = b"old") -> None:
    folder.mkdir()
    (folder / "marker.json").write_text(json.dumps({"format": "test-format"}))
    (folder / "data.bin").write_bytes(payload)


# ---- the rules, on the shared helper ----------------------------------------------------------------------
def test_output_may_not_be_or_contain_an_input_even_through_symlinks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(b"weights")
    link = tmp_path / "link"
    link.symlink_to(src)
    for out in (src, link, tmp_path):  # the input itself, a symlink to it, a folder containing it
        with pytest.raises(PolarError, match="is the input|contains the input"):
            check_target(out, KIND, inputs=[src], overwrite=True)
    # an input folder whose file is a symlink into the output (an HF cache snapshot -> blobs)
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    blobs.mkdir()
    snap.mkdir()
    (blobs / "abc").write_bytes(b"weights")
    (snap / "model.safetensors").symlink_to(blobs / "abc")
    with pytest.raises(PolarError, match="contains the input"):
        check_target(blobs, KIND, inputs=[snap], overwrite=True)


def test_overwrite_replaces_only_an_output_of_the_same_kind(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(PolarError, match="already exists"):
        check_target(user, KIND)
    with pytest.raises(PolarError, match="not a test output"):
        check_target(user, KIND, overwrite=True)
    (tmp_path / "empty").mkdir()
    assert check_target(tmp_path / "empty", KIND) == (tmp_path / "empty").resolve()  # an empty folder is free
    ours = tmp_path / "ours"
    _write_output(ours)
    (ours / "notes.txt").write_text("mine")
    with atomic_folder(ours, KIND, overwrite=True) as tmp:
        (tmp / "marker.json").write_text(json.dumps({"format": "test-format"}))
        (tmp / "data.bin").write_bytes(b"new")
    assert (ours / "data.bin").read_bytes() == b"new"
    assert (ours / "notes.txt").read_text() == "mine"  # a user's file in an output is carried over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ours", "user"]  # no temporary left


def test_interrupted_write_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    _write_output(out)
    before = tree_digest(out)
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out, KIND, overwrite=True) as tmp:
            (tmp / "data.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- convert ----------------------------------------------------------------------------------------------
def test_convert_onto_its_own_input_is_refused(tmp_path, capsys):
    """Found: `convert X X --overwrite` exited 0 and replaced the HF files (model.safetensors gone)."""
    src = write_hf(tmp_path / "hf", TINY_OPT)
    before = tree_digest(src)
    assert_refused(capsys, ["convert", src, src, "--overwrite"], "is the input")
    assert_refused(capsys, ["convert", src, tmp_path, "--overwrite"], "contains the input")
    link = tmp_path / "link"
    link.symlink_to(src)
    assert_refused(capsys, ["convert", src, link, "--overwrite"], "is the input")
    assert tree_digest(src) == before


def test_convert_overwrite_refuses_a_user_folder(tmp_path, capsys):
    """Found: `convert SRC DIR --overwrite` deleted unrelated files in DIR (a notes.txt was lost)."""
    src = write_hf(tmp_path / "hf", TINY_OPT)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert_refused(capsys, ["convert", src, user, "--overwrite"], "not a polar-jax checkpoint")
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"] and (user / "notes.txt").read_text() == "keep me"
    # an earlier conversion is replaced, with the user's notes kept
    out = convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    (out / "notes.txt").write_text("about this checkpoint")
    code, _, err = run_cli(capsys, "convert", src, out, "--overwrite", "--dtype", "float16")
    assert code == 0, err
    assert json.loads((out / "polar_jax.json").read_text())["dtype"] == "float16"
    assert (out / "notes.txt").read_text() == "about this checkpoint"


def test_interrupted_reconversion_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    src = write_hf(tmp_path / "hf", TINY_OPT)
    out = convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    before = tree_digest(out)
    real = convert_hf.write_streaming

    def write_then_fail(path, specs, produce, **kw):
        real(path, specs, produce, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_hf, "write_streaming", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, out, overwrite=True, progress=False)
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
    load(out)  # still loads, weights verified


# ---- convert from a GGUF file ------------------------------------------------------------------------------
def test_gguf_convert_never_writes_over_its_source(tmp_path, capsys):
    """The GGUF path is a file, not a folder: the output may still not be the file, a symlink to it, or a
    folder holding it (the user's folder of models), with or without --overwrite."""
    models = tmp_path / "models"
    models.mkdir()
    gguf_file = models / "m.gguf"
    write_gguf(gguf_file, "llama")
    (models / "notes.txt").write_text("where these came from")
    link = tmp_path / "link.gguf"
    link.symlink_to(gguf_file)
    before = tree_digest(models)
    cases = [
        ([gguf_file, gguf_file, "--overwrite"], "is the input"),
        ([gguf_file, link, "--overwrite"], "is the input"),
        ([link, gguf_file, "--overwrite"], "is the input"),
        ([gguf_file, models, "--overwrite"], "contains the input"),
        ([gguf_file, models], "contains the input"),
        ([gguf_file, tmp_path, "--overwrite"], "contains the input"),
        ([link, models, "--overwrite"], "contains the input"),  # through the symlink: the real file is in there
    ]
    for argv, words in cases:
        assert_refused(capsys, ["convert", *argv], words)
        with pytest.raises(PolarError, match=words):
            convert_checkpoint(argv[0], argv[1], overwrite="--overwrite" in argv, progress=False)
    assert tree_digest(models) == before and link.resolve() == gguf_file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "models"]  # no temporary left


def test_gguf_convert_overwrite_keeps_user_files(tmp_path, capsys):
    """--overwrite with a GGUF source refuses a user's folder (its files untouched) and replaces an earlier
    checkpoint (converted from HF or GGUF) while moving the user's files into the new one."""
    gguf_file = tmp_path / "m.gguf"
    write_gguf(gguf_file, "llama")
    source = tree_digest(gguf_file)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    (user / "params.safetensors").write_bytes(b"my own file that happens to have this name")
    mine = tree_digest(user)
    assert_refused(capsys, ["convert", gguf_file, user, "--overwrite"], "not a polar-jax checkpoint")
    assert tree_digest(user) == mine
    out = convert_checkpoint(write_hf(tmp_path / "hf", TINY_OPT), tmp_path / "ckpt", progress=False)
    (out / "notes.txt").write_text("about this checkpoint")
    (out / "special_tokens_map.json").write_text("{}")  # a checkpoint file the GGUF conversion does not write
    code, _, err = run_cli(capsys, "convert", gguf_file, out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "polar_jax.json").read_text())["source"] == "m.gguf"
    assert (out / "notes.txt").read_text() == "about this checkpoint"
    assert not (out / "special_tokens_map.json").exists()  # the old checkpoint's own file went with it
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt", "params.safetensors",
                                                     "polar_jax.json", "tokenizer.json", "tokenizer_config.json"]
    assert tree_digest(gguf_file) == source
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf", "m.gguf", "mine"]
    load(out)  # weights verified


# ---- collect, train-routers, calibrate ---------------------------------------------------------------------
def test_router_verbs_never_write_over_their_inputs(tmp_path, capsys):
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    text = text_dir / "t.txt"
    shutil.copyfile(require(VALID), text)
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    data = tmp_path / "data"
    data.mkdir()
    (data / "collect.json").write_text(json.dumps({"format": "polar-jax-router-data", "complete": True}))
    before = {p: tree_digest(p) for p in (text_dir, bundle, data)}
    cases = [
        (["collect", "--text", text, "--out", text_dir, "--overwrite"], "contains the input"),
        (["collect", "--text", text, "--out", DEFAULT_MODEL_DIR.parent, "--overwrite"], "contains the input"),
        (["train-routers", "--data", data, "--out", data, "--overwrite"], "is the input"),
        (["train-routers", "--data", data, "--out", text_dir, "--overwrite"], "not a sparsity bundle"),
        (["calibrate", "--bundle", bundle, "--data", data, "--out", data, "--overwrite"], "is the input"),
        (["calibrate", "--bundle", bundle, "--data", data, "--out", tmp_path, "--overwrite"], "contains the input"),
    ]
    for argv, words in cases:
        assert_refused(capsys, argv, words)
    assert {p: tree_digest(p) for p in before} == before


@pytest.fixture(scope="module")
def small_collection(tmp_path_factory):
    """Router data from the embedded model (the default bundle's model): enough held-out tokens (256) for
    calibration at every batch size."""
    root = tmp_path_factory.mktemp("collect")
    code = run_cli_plain(["collect", "--text", require(VALID), "--out", root / "data", "--seq-len", "32",
                          "--max-tokens", "2700", "--batch-size", "96"])
    assert code == 0
    return root / "data"


def run_cli_plain(argv) -> int:
    from polar_jax.cli import main

    return main([str(a) for a in argv])


def test_calibrate_in_place_is_atomic(tmp_path, capsys, monkeypatch, small_collection):
    """Calibrating in place (the default) replaces the bundle only once the new one is written."""
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    before = tree_digest(bundle)
    real = safetensors.numpy.save_file

    def save_then_fail(tensors, path, *a, **kw):
        real(tensors, path, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", save_then_fail)
    code, _, _ = run_cli(capsys, "calibrate", "--bundle", bundle, "--data", small_collection, "--batches", "2")
    assert code == 130  # interrupted
    assert tree_digest(bundle) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    code, _, err = run_cli(capsys, "calibrate", "--bundle", bundle, "--data", small_collection, "--batches", "2",
                           "--recall", "0.9")
    assert code == 0, err
    assert tree_digest(bundle) != before  # recalibrated, in place
    assert load_bundle(bundle).config.mlp_table(0.9) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
