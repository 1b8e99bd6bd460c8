"""GGUF conversion on tiny files written like llama.cpp writes them (tests/gguf_factory.py): every tensor type,
the q/k un-permutation, both architectures, the converted checkpoint, and the bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import polar_jax
from convert import convert_checkpoint
from convert.gguf_source import GGUFSource
from gguf_factory import SPECIALS, USER_DEFINED, write_gguf
from polar_jax.checkpoint import flat_params
from polar_jax.cli import main as cli_main
from polar_jax.errors import CheckpointError, UnsupportedModelError

# Every supported type somewhere in one model (d = ffn = 256 so K-quant rows hold whole 256-blocks).
MIXED = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K, "attn_q.weight": Q.Q4_K, "attn_k.weight": Q.Q4_1,
         "attn_v.weight": Q.Q5_0, "attn_output.weight": Q.Q5_1, "ffn_gate.weight": Q.Q4_0, "ffn_up.weight": Q.Q5_K,
         "ffn_down.weight": Q.BF16}


def _polar_name(gguf_name: str) -> tuple[str, bool]:
    """(polar-jax parameter, transposed?) for a GGUF tensor name, written out independently of the mapping."""
    fixed = {"token_embd.weight": ("embed_tokens", False), "output.weight": ("lm_head", False),
             "output_norm.weight": ("norm.weight", False)}
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, i, rest = gguf_name.split(".", 2)
    table = {"attn_norm.weight": ("attn_norm.weight", False), "ffn_norm.weight": ("mlp_norm.weight", False),
             "attn_q.weight": ("attn.q", True), "attn_k.weight": ("attn.k", True), "attn_v.weight": ("attn.v", True),
             "attn_output.weight": ("attn.o", True), "attn_q.bias": ("attn.q_bias", False),
             "attn_k.bias": ("attn.k_bias", False), "attn_v.bias": ("attn.v_bias", False),
             "ffn_gate.weight": ("mlp.gate", False), "ffn_up.weight": ("mlp.up", False),
             "ffn_down.weight": ("mlp.down", True)}
    name, t = table[rest]
    return f"layers.{i}.{name}", t


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(d=256, ffn=256, heads=4, kv=2, tied=False, types=MIXED)),
    ("llama", dict(d=64, heads=4, kv=4, default_type=Q.F16)),  # MHA, tied, half precision
    ("qwen2", dict(d=64, heads=4, kv=2, default_type=Q.Q8_0)),  # q/k/v biases, no rotary permutation
])
def test_every_parameter_equals_the_written_tensor(tmp_path, arch, kw):
    path = tmp_path / "m.gguf"
    expected = write_gguf(path, arch, **kw)
    model, tok = polar_jax.load_hf(path, dtype="float32")
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    assert set(params) == {_polar_name(n)[0] for n in expected}
    for gname, want in expected.items():
        name, transposed = _polar_name(gname)
        np.testing.assert_array_equal(params[name], want.T if transposed else want, err_msg=gname)
    cfg = model.config
    assert cfg.model_type == arch and cfg.qkv_bias == (arch == "qwen2")
    assert cfg.tie_word_embeddings == kw.get("tied", True)
    assert tok is not None and tok.eos_token_id == tok._backend.token_to_id(SPECIALS[2])


def test_rotary_unpermutation_is_needed(tmp_path):
    """The factory permutes q/k rows as llama.cpp does; reading a llama file as if it were qwen2 (no
    un-permutation) must give different q/k, so the test above would catch a missing or wrong inverse."""
    path = tmp_path / "m.gguf"
    expected = write_gguf(path, "llama", d=64, heads=4, kv=2)
    src = GGUFSource(path)
    raw_q = src.file.tensor("blk.0.attn_q.weight")
    assert not np.array_equal(raw_q, expected["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(src.get("layers.0.attn.q"), expected["blk.0.attn_q.weight"].T)
    src.close()


def test_converted_checkpoint_loads_the_same_model_and_tokenizer(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", d=64, heads=4, kv=2, default_type=Q.Q8_0, add_bos=True)
    out = convert_checkpoint(path, tmp_path / "ckpt", progress=False)
    direct, tok = polar_jax.load_hf(path)
    conv, tok2 = polar_jax.load(out)
    via_load, _ = polar_jax.load(path)  # load() takes the .gguf file too
    a, b, c = flat_params(direct), flat_params(conv), flat_params(via_load)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(c[k]), err_msg=k)
    text = f"{SPECIALS[1]}the cat sat in {USER_DEFINED[0]} 12 rooms{SPECIALS[2]}"
    ids = tok.encode(text)
    assert ids == tok2.encode(text)
    assert tok.decode(ids) == tok2.decode(ids) == "the cat sat in <think> 12 rooms"  # specials skipped
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama" and hf_cfg["dtype"] == "float32"
    assert json.loads((out / "polar_jax.json").read_text())["source"] == "m.gguf"
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_tokenizer_keeps_special_and_user_tokens_whole(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama")
    src = GGUFSource(path)
    tok = src.tokenizer()
    vocab = tok._backend.get_vocab()
    ids = tok.encode(f"a{SPECIALS[3]}b{USER_DEFINED[0]}")  # a control token that is no bos/eos/pad, a user token
    assert ids == [vocab["a"], vocab[SPECIALS[3]], vocab["b"], vocab[USER_DEFINED[0]]]
    assert tok.decode(ids) == f"ab{USER_DEFINED[0]}"  # control tokens are special: skipped when decoding
    assert tok.encode(" the") == [vocab["Ġthe"]]  # merges applied in order: Ġ t -> Ġt, h e -> he, Ġt he
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"  # byte-level round trip
    src.close()


# ---- bad input --------------------------------------------------------------------------------------
def _cli(*args) -> int:
    return cli_main(["convert", *map(str, args)])


def test_truncated_file_is_refused_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama")
    data = path.read_bytes()
    for cut, where in ((len(data) - 1000, "data"), (2000, "header"), (10, "magic")):
        bad = tmp_path / f"cut_{where}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            GGUFSource(bad)
        assert _cli(bad, tmp_path / f"out_{where}") == 2
        assert capsys.readouterr().err.startswith("error: ")
        assert not (tmp_path / f"out_{where}").exists()
    assert list(tmp_path.glob(".out_*")) == []  # no partial folder left behind


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFSource(bad)


def test_unsupported_tensor_type_is_named(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", d=256, ffn=256, types={"ffn_up.weight": Q.Q2_K})
    with pytest.raises(CheckpointError, match=r"Q2_K.*blk\.0\.ffn_up\.weight"):
        GGUFSource(path)
    assert _cli(path, tmp_path / "out") == 2
    assert "Q2_K" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_named(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_gguf(path, "phi3")
    with pytest.raises(UnsupportedModelError, match="'phi3'"):
        GGUFSource(path)
    assert _cli(path, tmp_path / "out") == 2
    assert "phi3" in capsys.readouterr().err


def test_missing_tokenizer_is_refused(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", tokenizer=False)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        GGUFSource(path)
    assert _cli(path, tmp_path / "out") == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_existing_output_folder_is_kept(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(path, out, progress=False)
    assert _cli(path, out) == 2
    assert (out / "mine.txt").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_missing_tensor_and_wrong_shape(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", skip=("blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"lacks tensors \['blk\.1\.ffn_down\.weight'\]"):
        GGUFSource(path)
    path2 = tmp_path / "m2.gguf"
    write_gguf(path2, "llama", ffn=96, extra_meta={"add_feed_forward_length": 128})  # metadata says 128 (last wins)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        GGUFSource(path2)
