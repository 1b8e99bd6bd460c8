import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import convert.hf as convert_hf
import polar_jax
from convert import convert_checkpoint
from polar_jax.checkpoint import flat_params
from polar_jax.errors import CheckpointError, UnsupportedModelError
from conftest import model_dir
from hf_factory import TINY_LLAMA, TINY_OPT, write_hf

TOKENS = jnp.array([[5, 17, 3, 42, 8, 9, 11]], jnp.int32)


@pytest.mark.parametrize("hf_config", [TINY_LLAMA, TINY_OPT], ids=["llama", "opt"])
def test_convert_then_load_matches_on_the_fly(tmp_path, hf_config):
    src = write_hf(tmp_path / "hf", hf_config, seed=1)
    out = convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    a, _ = polar_jax.load_hf(src)
    b, _ = polar_jax.load(out)
    np.testing.assert_array_equal(np.asarray(a(TOKENS)), np.asarray(b(TOKENS)))
    meta = json.loads((out / "polar_jax.json").read_text())
    assert meta["format"] == "polar-jax" and len(meta["weights_sha256"]) == 64


def test_layouts_follow_the_design(tmp_path):
    """MLP weights neuron-major, attention [in, out]: compare against the HF tensors directly."""
    from hf_factory import hf_tensors

    src = write_hf(tmp_path / "hf", TINY_LLAMA, seed=2)
    params = flat_params(polar_jax.load_hf(src)[0])
    hf = hf_tensors(TINY_LLAMA, seed=2)
    np.testing.assert_array_equal(params["layers.1.mlp.down"], hf["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(params["layers.1.mlp.up"], hf["model.layers.1.mlp.up_proj.weight"])
    np.testing.assert_array_equal(params["layers.0.attn.k"], hf["model.layers.0.self_attn.k_proj.weight"].T)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    one = write_hf(tmp_path / "one", TINY_LLAMA, seed=3)
    many = write_hf(tmp_path / "many", TINY_LLAMA, seed=3, shards=3)
    assert len(list(many.glob("*.safetensors"))) == 3
    a, b = polar_jax.load_hf(one)[0], polar_jax.load_hf(many)[0]
    np.testing.assert_array_equal(np.asarray(a(TOKENS)), np.asarray(b(TOKENS)))


def test_dtype_conversion(tmp_path):
    src = write_hf(tmp_path / "hf", TINY_OPT, seed=4)
    out = convert_checkpoint(src, tmp_path / "bf16", dtype="bfloat16", progress=False)
    model, _ = polar_jax.load(out, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    w = np.asarray(flat_params(model)["layers.0.mlp.up"])
    from hf_factory import hf_tensors

    ref = hf_tensors(TINY_OPT, seed=4)["model.decoder.layers.0.fc1.weight"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(w, ref)


def test_real_checkpoint_round_trip(tmp_path):
    out = convert_checkpoint(model_dir("polar-tiny-opt"), tmp_path / "c", progress=False)
    assert (out / "tokenizer.json").is_file() and oct(out.stat().st_mode & 0o777) == "0o755"
    a, tok = polar_jax.load(out)
    b, _ = polar_jax.load_hf(model_dir("polar-tiny-opt"))
    ids = jnp.array([tok.encode("The history of the city")])
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


def test_missing_shard(tmp_path):
    src = write_hf(tmp_path / "hf", TINY_LLAMA, shards=2)
    os.remove(src / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="missing shard model-00002-of-00002"):
        polar_jax.load_hf(src)


def test_shape_mismatch_is_named(tmp_path):
    src = write_hf(tmp_path / "hf", TINY_LLAMA)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch for model.layers.0.mlp.gate_proj.weight"):
        polar_jax.load_hf(src)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = write_hf(tmp_path / "hf", TINY_LLAMA)
    t = load_file(str(src / "model.safetensors"))
    del t["model.layers.1.self_attn.v_proj.weight"]
    save_file(t, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.v_proj.weight"):
        polar_jax.load_hf(src)


def test_truncated_and_garbage_files(tmp_path):
    src = write_hf(tmp_path / "hf", TINY_LLAMA)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        polar_jax.load_hf(src)
    (src / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        polar_jax.load_hf(src)


def test_missing_paths_and_formats(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        polar_jax.load_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        polar_jax.load(tmp_path / "nope")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(TINY_LLAMA))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors only"):
        polar_jax.load_hf(tmp_path / "bin")
    with pytest.raises(CheckpointError, match="Hugging Face folder"):
        polar_jax.load(tmp_path / "bin")


def test_unsupported_architecture(tmp_path):
    src = write_hf(tmp_path / "hf", TINY_LLAMA)
    (src / "config.json").write_text(json.dumps(dict(TINY_LLAMA, model_type="falcon")))
    with pytest.raises(UnsupportedModelError, match="falcon"):
        polar_jax.load_hf(src)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    src = write_hf(tmp_path / "hf", TINY_LLAMA)
    real = convert_hf.write_streaming

    def failing(path, specs, produce, **kw):
        count = {"n": 0}

        def produce_then_fail(name):
            count["n"] += 1
            if count["n"] == 5:
                raise KeyboardInterrupt
            return produce(name)

        return real(path, specs, produce_then_fail, **kw)

    monkeypatch.setattr(convert_hf, "write_streaming", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_refuses_to_overwrite(tmp_path):
    src = write_hf(tmp_path / "hf", TINY_OPT)
    convert_checkpoint(src, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    convert_checkpoint(src, tmp_path / "out", overwrite=True, progress=False)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "polar_jax.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_convert_and_errors(tmp_path):
    src = write_hf(tmp_path / "hf", TINY_OPT)
    ok = _cli("convert", str(src), str(tmp_path / "out"), "--dtype", "float16")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "polar_jax.json").read_text())["dtype"] == "float16"
    os.remove(src / "model.safetensors")
    bad = _cli("convert", str(src), str(tmp_path / "out2"))
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("convert", str(tmp_path / "nowhere"), str(tmp_path / "out3"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
