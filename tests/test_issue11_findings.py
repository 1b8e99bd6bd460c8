"""Each finding of issue 11 (a new user's run of every CLI verb and the README's API), as a test that failed
on the code the issue was filed against. Only the public surface is used (`polar_jax.cli.main` in-process,
`polar_jax.load/generate`, `model(ids)`, `convert_checkpoint`)."""

from __future__ import annotations

import hashlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
from cli_helpers import assert_refused, run_cli, tree_digest
from conftest import SHARED, model_dir, require
from convert import convert_checkpoint
from convert.safetensors_io import SafetensorsFile, write_streaming
from hf_factory import TINY_OPT, write_hf
from polar_jax.cli import main
from polar_jax.errors import CheckpointError, InputError
from polar_jax.layout import hash_tensor

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
DEFAULT_BUNDLE = polar_jax.routers.bundle.DEFAULT_DIR


@pytest.fixture(scope="module")
def default_model():
    return polar_jax.load("default")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Router data of the embedded model, enough for training and calibration at every batch size."""
    out = tmp_path_factory.mktemp("findings") / "data"
    assert main(["collect", "--text", str(require(VALID)), "--out", str(out), "--seq-len", "32",
                 "--max-tokens", "2700", "--batch-size", "96"]) == 0
    return out


# ---- data loss -----------------------------------------------------------------------------------------
def test_convert_onto_the_input_with_overwrite(tmp_path, capsys):
    src = write_hf(tmp_path / "hf", TINY_OPT)
    before = tree_digest(src)
    assert_refused(capsys, ["convert", src, src, "--overwrite"], "is the input")
    assert tree_digest(src) == before  # model.safetensors still there, unchanged


def test_convert_overwrite_into_a_user_folder(tmp_path, capsys):
    src = write_hf(tmp_path / "hf", TINY_OPT)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert_refused(capsys, ["convert", src, user, "--overwrite"], "not a polar-jax checkpoint")
    assert tree_digest(user) == {"notes.txt": tree_digest(user / "notes.txt")["notes.txt"]}


# ---- tracebacks (exit 1) and silently wrong results (exit 0) became one error line -----------------------
@pytest.mark.parametrize("argv, words", [
    (["eval", "ppl", "--text", VALID, "--batch-size", "0", "--max-tokens", "512"], "--batch-size"),
    (["eval", "ppl", "--text", VALID, "--batch-size", "-1", "--max-tokens", "512"], "--batch-size"),
    (["eval", "agreement", "--sparsity", "default", "--text", VALID, "--prompt-len", "0", "--max-tokens", "512"],
     "--prompt-len"),
])
def test_eval_batch_and_prompt_sizes(capsys, argv, words):
    assert_refused(capsys, argv, words)


def test_collect_batch_size_zero(tmp_path, capsys):
    assert_refused(capsys, ["collect", "--text", VALID, "--out", tmp_path / "d", "--batch-size", "0",
                            "--max-tokens", "512", "--seq-len", "32"], "--batch-size")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flags, words", [(["--batch-size", "0"], "--batch-size"), (["--lr", "-1"], "--lr")])
def test_train_routers_batch_size_and_learning_rate(tmp_path, capsys, collection, flags, words):
    assert_refused(capsys, ["train-routers", "--data", collection, "--out", tmp_path / "b", "--epochs", "1", *flags],
                   words)
    assert not (tmp_path / "b").exists()


def test_calibrate_zero_batches(tmp_path, capsys, collection):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    before = tree_digest(bundle)
    assert_refused(capsys, ["calibrate", "--bundle", bundle, "--data", collection, "--batches", "0"], "--batches")
    assert tree_digest(bundle) == before


def test_attention_density_without_a_bundle_is_not_ignored(capsys):
    assert_refused(capsys, ["generate", "hello", "--attn-density", "0.5", "--max-new-tokens", "2"], "--sparsity")


def test_binary_text_file_is_not_scored(tmp_path, capsys):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    assert_refused(capsys, ["eval", "ppl", "--text", binary, "--seq-len", "16"], "not a text file")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait , d\xe9j\xe0 vu .\n".encode("latin-1") * 200)
    assert_refused(capsys, ["eval", "ppl", "--text", latin1, "--seq-len", "16"], "not UTF-8")


def test_float_token_ids_are_refused(default_model):
    model, _ = default_model
    with pytest.raises(InputError, match="int"):
        polar_jax.generate(model, [[1.5, 2.0]], max_new_tokens=2)


def test_model_call_checks_vocabulary_and_positions(default_model):
    model, _ = default_model
    vocab, positions = model.config.vocab_size, model.config.max_position_embeddings
    with pytest.raises(InputError, match="vocabulary"):
        model(jnp.asarray([[5, vocab]], jnp.int32))
    with pytest.raises(InputError, match="vocabulary"):
        model(jnp.asarray([[-1, 5]], jnp.int32))
    with pytest.raises(InputError, match=f"{positions} positions"):
        model(jnp.zeros((1, positions + 88), jnp.int32))
    with pytest.raises(InputError, match="integer"):
        model(jnp.asarray([[1.5, 2.0]]))
    ids = jnp.asarray([[5, 17, 3]], jnp.int32)
    assert np.isfinite(np.asarray(model(ids))).all()
    # under jit the values are unknown while tracing: no check of them, and no false alarm
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t: model(t))(ids)), np.asarray(model(ids)), rtol=1e-5, atol=1e-5)


def test_flipped_bytes_in_a_converted_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(polar_jax.checkpoint.DEFAULT_MODEL_DIR, ckpt)
    params = ckpt / "params.safetensors"
    data = bytearray(params.read_bytes())
    data[-1000] ^= 0x40  # one bit of one weight, far from the header
    params.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights_sha256"):
        polar_jax.load(ckpt)
    assert_refused(capsys, ["generate", "hello", "--model", ckpt, "--max-new-tokens", "1"], "weights_sha256")


def test_no_verify_skips_the_check_on_trusted_disks(tmp_path, capsys):
    """verify=False / --no-verify load a file whose bytes no longer match weights_sha256 (the user's choice,
    for speed); the default refuses it."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(polar_jax.checkpoint.DEFAULT_MODEL_DIR, ckpt)
    reference, _ = polar_jax.load(ckpt)
    meta = json.loads((ckpt / "polar_jax.json").read_text())
    meta["weights_sha256"] = "0" * 64  # as if one weight had changed
    (ckpt / "polar_jax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights_sha256"):
        polar_jax.load(ckpt)
    model, _ = polar_jax.load(ckpt, verify=False)
    ids = jnp.asarray([[5, 17, 3]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(reference(ids)))
    assert_refused(capsys, ["generate", "hello", "--model", ckpt, "--max-new-tokens", "1"], "--no-verify")
    code, out, err = run_cli(capsys, "generate", "hello", "--model", ckpt, "--max-new-tokens", "1", "--no-verify")
    assert code == 0 and out.startswith("hello"), err


def test_weights_are_verified_in_any_file_order(tmp_path):
    """The hash streams while the loader reads the tensors in the model's order; a file that stores them in
    another order is hashed in file order afterwards, and a changed byte is still caught."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(polar_jax.checkpoint.DEFAULT_MODEL_DIR, ckpt)
    params = ckpt / "params.safetensors"
    src = SafetensorsFile(params)
    names = src.data_order()[::-1]  # the loader's order reversed: it can never stream the hash
    tensors = {n: np.array(src.get(n)) for n in names}
    src.close()
    digest = hashlib.sha256()
    for n in names:
        hash_tensor(digest, n, tensors[n])
    params.unlink()
    write_streaming(params, [(n, tensors[n].shape, tensors[n].dtype) for n in names], tensors.__getitem__,
                    metadata={"format": "polar-jax"})
    reread = SafetensorsFile(params)
    assert reread.data_order() == names
    reread.close()
    meta = json.loads((ckpt / "polar_jax.json").read_text())
    meta["weights_sha256"] = digest.hexdigest()
    (ckpt / "polar_jax.json").write_text(json.dumps(meta))
    polar_jax.load(ckpt)  # verified
    data = bytearray(params.read_bytes())
    data[-1000] ^= 0x40
    params.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights_sha256"):
        polar_jax.load(ckpt)


@pytest.mark.parametrize("name, content, words", [
    ("tokenizer.json", b'{"version": "1.0", "model": ', "cannot read"),
    ("tokenizer.json", b"\x00\xff" * 50, "cannot read"),
    ("generation_config.json", b'{"eos_token_id": 1.5}', "eos_token_id must be an integer"),
    ("generation_config.json", b'{"pad_token_id": "0"}', "pad_token_id must be an integer"),
    ("generation_config.json", b"{", "not valid JSON"),
    ("tokenizer_config.json", b"[1, 2]", "expected an object"),
])
def test_malformed_tokenizer_files_are_checkpoint_errors(tmp_path, capsys, name, content, words):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(polar_jax.checkpoint.DEFAULT_MODEL_DIR, ckpt)
    if name == "tokenizer_config.json":
        (ckpt / "generation_config.json").unlink()  # so the EOS / pad ids are looked up in tokenizer_config.json
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if not k.endswith("_token_id")}))
    (ckpt / name).write_bytes(content)
    before = tree_digest(ckpt)
    with pytest.raises(CheckpointError, match=words):
        polar_jax.load(ckpt, verify=False)
    assert_refused(capsys, ["generate", "hi", "--model", ckpt, "--max-new-tokens", "1"], words)
    assert tree_digest(ckpt) == before


def test_malformed_sentencepiece_tokenizer_is_a_checkpoint_error(tmp_path):
    """A folder with tokenizer.model / vocab.json but no tokenizer.json goes through transformers: its many
    exception types for a bad file become one CheckpointError."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_bytes(b"{not json")
    with pytest.raises(CheckpointError, match="cannot read the tokenizer files"):
        polar_jax.tokenizer.load_tokenizer(folder)


# ---- misleading messages ---------------------------------------------------------------------------------
def test_opt_config_with_a_wrong_hidden_size(tmp_path):
    src = write_hf(tmp_path / "hf", TINY_OPT)
    (src / "config.json").write_text(json.dumps(dict(TINY_OPT, hidden_size=48, ffn_dim=64)))
    with pytest.raises(CheckpointError) as err:
        polar_jax.load_hf(src)
    assert "shape mismatch" in str(err.value) and "project_in" not in str(err.value)


def test_reconverting_a_converted_folder(tmp_path, capsys):
    src = write_hf(tmp_path / "hf", TINY_OPT)
    out = convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    assert_refused(capsys, ["convert", out, tmp_path / "again"], "already a polar-jax checkpoint")
    assert not (tmp_path / "again").exists()


def test_text_argument_that_is_a_folder(tmp_path, capsys):
    assert_refused(capsys, ["eval", "ppl", "--text", tmp_path, "--seq-len", "16"], "is a folder")


def test_model_path_of_the_wrong_kind_says_what_is_expected(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    folder = tmp_path / "mine"
    folder.mkdir()
    for path, words in ((text, "neither a folder nor a GGUF file"), (folder, "has no config.json")):
        line = assert_refused(capsys, ["generate", "hi", "--model", path, "--max-new-tokens", "1"], words)
        assert ".gguf file" in line and "converted checkpoint" in line


def test_dense_run_flags_name_what_they_need(capsys):
    assert_refused(capsys, ["eval", "ppl", "--text", VALID, "--no-mlp"], "--no-mlp needs --sparsity")
    assert_refused(capsys, ["eval", "ppl", "--text", VALID, "--no-mlp", "--per-layer"], "need --sparsity")


# ---- CLI honesty -----------------------------------------------------------------------------------------
def test_eval_ppl_is_dense_unless_sparsity_is_given(capsys, wikitext_test):
    """It used to default to --sparsity default, which refuses any model but the embedded one."""
    code, out, err = run_cli(capsys, "eval", "ppl", "--model", model_dir("tiny-opt"), "--text", wikitext_test,
                             "--max-tokens", "512", "--seq-len", "128", "--json")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["mode"] == "dense" and res["sparsity"] is None and np.isfinite(res["ppl"]) and res["ppl"] > 1


def _flag_help(help_text: str, flag: str) -> str:
    """The help entry of one flag in a `--help` output, whitespace normalised."""
    return " ".join(help_text.split(f"\n  {flag}", 1)[1].split("\n  -", 1)[0].split())


def test_help_shows_defaults_and_demo_matches_generate(capsys):
    code, generate, _ = run_cli(capsys, "generate", "--help")
    assert code == 0 and "(default: 32)" in _flag_help(generate, "--max-new-tokens")
    assert "(default: 1.0)" in _flag_help(generate, "--top-p")
    code, ppl, _ = run_cli(capsys, "eval", "ppl", "--help")
    assert code == 0 and "(default: 256)" in _flag_help(ppl, "--seq-len") and "(default: 8)" in _flag_help(ppl, "--batch-size")
    code, demo, _ = run_cli(capsys, "demo", "--help")
    assert code == 0
    for flag in ("--temperature", "--top-p", "--max-new-tokens", "--seed"):
        assert "(default: " in _flag_help(demo, flag)
        assert _flag_help(demo, flag) == _flag_help(generate, flag), flag


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip().startswith(f"polar-jax {polar_jax.__version__}")


def test_generate_streams_text_per_row_and_reports_speed_and_mode(capsys, default_model):
    prompts = ["The history of the city", "KING RICHARD :"]
    code, plain, err = run_cli(capsys, "generate", *prompts, "--max-new-tokens", "6")
    assert code == 0, err
    assert "tokens/s" in err and "dense" in err
    code, streamed, err = run_cli(capsys, "generate", *prompts, "--max-new-tokens", "6", "--stream")
    assert code == 0 and "tokens/s" in err
    assert streamed.strip() == plain.strip()  # text per row, prompt echoed: not token pieces joined by " | "
    assert streamed.startswith(prompts[0]) and "\n\n" + prompts[1] in streamed and " | " not in streamed
    code, out, err = run_cli(capsys, "generate", *prompts, "--max-new-tokens", "6", "--json")
    assert code == 0, err
    res = json.loads(out)
    model, tok = default_model
    ids = polar_jax.generate(model, [tok.encode(p) for p in prompts], max_new_tokens=6)
    assert [r["ids"] for r in res["rows"]] == [list(map(int, row)) for row in ids]
    assert res["decode"] == "dense" and res["tokens_per_s"] > 0
    assert plain.strip() == "\n\n".join(p + tok.decode(row) for p, row in zip(prompts, ids))


def test_generate_says_whether_it_ran_sparse(capsys):
    """With a bundle, the line says which variant ran: auto picks dense on a host with no measured speedup
    (and says so), a forced policy runs sparse; --json carries the same."""
    base = ["generate", "The album was released", "--sparsity", "default", "--max-new-tokens", "3"]
    code, _, err = run_cli(capsys, *base)
    assert code == 0 and "tokens/s" in err
    if jax.default_backend() == "cpu":
        assert "dense: policy auto chose dense here" in err
    code, _, err = run_cli(capsys, *base, "--policy", "heads", "--attn-density", "0.5")
    assert code == 0 and "sparse (heads, policy heads)" in err and "attention density 0.5" in err
    code, out, _ = run_cli(capsys, *base, "--policy", "both", "--json")
    res = json.loads(out)
    assert code == 0 and res["decode"] == "sparse" and res["variant"] == "both" and res["sparsity"] == "default"
