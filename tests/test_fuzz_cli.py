"""Property-based tests (hypothesis) of the loaders and the CLI: malformed config.json files, corrupted or
truncated safetensors and GGUF headers, corrupted converted checkpoints, random flag values.

The property, for every generated case: the run either succeeds with a finite result, or fails with one
clear error (the CLI: exit 2 and exactly one `error: ...` line; the API: a PolarError). Never a traceback
(any other exception fails the test) and never a changed input file.

CI runs a fixed number of derandomized examples (a fixed seed); `POLAR_NIGHTLY=1` runs 20x as many.
Each test records how many cases it ran and how they ended (a `fuzz_cases` property of the test, listed in
pytest's summary under "property-based tests" by tests/conftest.py, also with -n 2).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polar_jax
from cli_helpers import error_line, run_cli, tree_digest
from conftest import SHARED, require
from gguf_factory import write_gguf
from hf_factory import TINY_LLAMA, TINY_OPT, write_hf
from polar_jax.checkpoint import DEFAULT_MODEL_DIR
from polar_jax.errors import PolarError
from polar_jax.routers.bundle import DEFAULT_DIR as DEFAULT_BUNDLE

NIGHTLY = os.environ.get("POLAR_NIGHTLY") == "1"
SCALE = 20 if NIGHTLY else 1


def fuzz_settings(examples: int):
    return settings(max_examples=examples * SCALE, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


class Tally:
    """How the cases of one property test ended (recorded with the test's result, and checked to have run)."""

    def __init__(self, name: str, record_property: Callable[[str, object], None]):
        self.name, self.counts, self.record = name, collections.Counter(), record_property

    def add(self, outcome: str) -> None:
        self.counts[outcome] += 1

    def report(self, expected: int) -> None:
        total = sum(self.counts.values())
        line = f"{self.name}: {total} cases ({', '.join(f'{k} {v}' for k, v in sorted(self.counts.items()))})"
        self.record("fuzz_cases", line + (" [POLAR_NIGHTLY]" if NIGHTLY else ""))
        print("\n" + line)
        assert total >= expected // 2, f"only {total} cases ran"


def cli_case(capsys, argv, tally: Tally) -> tuple[int, str]:
    """Runs one CLI case; asserts it succeeded or exited 2 with one error line (no exception escaped)."""
    code, out, err = run_cli(capsys, *argv)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        error_line(err)
    tally.add("ok" if code == 0 else "error")
    return code, out


def finite_forward(model) -> None:
    ids = jnp.asarray([[1, 2, 3, 5, 8]], jnp.int32)
    assert np.isfinite(np.asarray(model(ids), np.float32)).all()


# ---- malformed config.json ---------------------------------------------------------------------------------
JSON_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(-(2**63), 2**64), st.sampled_from([0, 1, 2, 4, 8, 16, 32]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["llama", "opt", "mistral", "qwen2", "gpt2", "relu", "silu", "gelu_new", "float16", "int8",
                     "torch.bfloat16", "llama3", "linear", "yarn"]),
)
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                          max_leaves=6)
ROPE = st.fixed_dictionaries({}, optional={
    "rope_type": st.sampled_from(["default", "linear", "llama3", "dynamic", 3]), "factor": JSON_SCALAR,
    "low_freq_factor": JSON_SCALAR, "high_freq_factor": JSON_SCALAR, "original_max_position_embeddings": JSON_SCALAR,
    "rope_theta": JSON_SCALAR})
CONFIG_KEYS = sorted(set(TINY_LLAMA) | set(TINY_OPT) | {
    "head_dim", "sliding_window", "use_sliding_window", "rope_theta", "hidden_act", "attention_bias", "mlp_bias",
    "torch_dtype", "bos_token_id", "layer_norm_elementwise_affine", "_remove_final_layer_norm", "rope_scaling"})


@st.composite
def configs(draw):
    """A config.json's bytes: a real tiny config with some keys changed or removed, or not a config at all."""
    base = draw(st.sampled_from(["llama", "opt"]))
    hf = dict(TINY_LLAMA if base == "llama" else TINY_OPT)
    kind = draw(st.sampled_from(["edit"] * 8 + ["junk"]))
    if kind == "junk":
        return base, draw(st.sampled_from([b"", b"{", b"[]", b'"config"', b"\xff\xfe{}", b"null", b"[" * 5000 + b"]" * 5000,
                                           json.dumps(hf).encode()[:40]]))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(CONFIG_KEYS))
        action = draw(st.sampled_from(["set", "set", "delete", "rope"]))
        if action == "delete":
            hf.pop(key, None)
        elif action == "rope":
            hf[draw(st.sampled_from(["rope_scaling", "rope_parameters"]))] = draw(ROPE)
        else:
            hf[key] = draw(JSON_VALUE)
    return base, json.dumps(hf, allow_nan=True).encode()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_hf")
    return {"llama": write_hf(root / "llama", TINY_LLAMA, seed=1), "opt": write_hf(root / "opt", TINY_OPT, seed=2)}


def test_malformed_configs(tmp_path, capsys, tiny_hf, record_property):
    tally = Tally("malformed config.json", record_property)
    case = iter(range(10**9))

    @fuzz_settings(60)
    @given(configs())
    def run(spec):
        base, raw = spec
        src = tmp_path / f"hf{next(case)}"
        src.mkdir()
        (src / "config.json").write_bytes(raw)
        (src / "model.safetensors").symlink_to(tiny_hf[base] / "model.safetensors")
        before = tree_digest(src) | tree_digest(tiny_hf[base])
        code, _ = cli_case(capsys, ["convert", src, src.with_name(src.name + "_out")], tally)
        assert tree_digest(src) | tree_digest(tiny_hf[base]) == before
        if code == 0:
            model, _ = polar_jax.load(src.with_name(src.name + "_out"))
            finite_forward(model)

    run()
    tally.report(50 * SCALE)


# ---- corrupted safetensors ---------------------------------------------------------------------------------
def _header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def corruptions(size: int, region: int):
    """One corruption of a file of `size` bytes, as a small description (hypothesis prints failing cases):
    cut short, 1-4 bytes changed within the first `region` bytes, a new 8-byte header length, junk appended."""
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, region - 1), st.integers(1, 255)), min_size=1,
                                            max_size=4)),
        st.tuples(st.just("length"), st.one_of(st.integers(0, 2**64 - 1), st.integers(0, region + 16))),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    )


def corrupt(data: bytes, spec) -> bytes:
    op, arg = spec
    out = bytearray(data)
    if op == "truncate":
        return bytes(out[:arg])
    if op == "flip":
        for pos, mask in arg:
            out[pos] ^= mask
        return bytes(out)
    if op == "length":
        out[:8] = struct.pack("<Q", arg)
        return bytes(out)
    return bytes(out) + arg


def test_corrupted_safetensors_headers(tmp_path, capsys, tiny_hf, record_property):
    """An HF folder whose model.safetensors header is corrupted or cut: converted, or refused."""
    tally = Tally("corrupted HF safetensors", record_property)
    data = (tiny_hf["llama"] / "model.safetensors").read_bytes()
    case = iter(range(10**9))

    @fuzz_settings(50)
    @given(corruptions(len(data), _header_end(data)))
    def run(spec):
        bad = corrupt(data, spec)
        src = tmp_path / f"hf{next(case)}"
        src.mkdir()
        shutil.copyfile(tiny_hf["llama"] / "config.json", src / "config.json")
        (src / "model.safetensors").write_bytes(bad)
        before = tree_digest(src)
        code, _ = cli_case(capsys, ["convert", src, src.with_name(src.name + "_out")], tally)
        assert tree_digest(src) == before
        if code == 0:
            finite_forward(polar_jax.load(src.with_name(src.name + "_out"))[0])

    run()
    tally.report(50 * SCALE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_hf):
    out = tmp_path_factory.mktemp("fuzz_ckpt") / "ckpt"
    assert polar_jax.cli.main(["convert", str(tiny_hf["llama"]), str(out)]) == 0
    return out


def test_corrupted_converted_checkpoints(tmp_path, converted, record_property):
    """A converted checkpoint with any byte of its weights file changed, or its marker / config damaged:
    loads the same model (a change that does not matter), or is refused; the SHA-256 catches weight bytes."""
    tally = Tally("corrupted converted checkpoint", record_property)
    files = {name: (converted / name).read_bytes() for name in ("params.safetensors", "polar_jax.json", "config.json")}
    reference = np.asarray(polar_jax.load(converted)[0](jnp.asarray([[1, 2, 3, 5, 8]], jnp.int32)))
    case = iter(range(10**9))

    @fuzz_settings(50)
    @given(st.sampled_from(sorted(files)).flatmap(
        lambda name: st.tuples(st.just(name), corruptions(len(files[name]), len(files[name])))))
    def run(spec):
        name, damage = spec
        bad = corrupt(files[name], damage)
        ckpt = tmp_path / f"c{next(case)}"
        shutil.copytree(converted, ckpt)
        (ckpt / name).write_bytes(bad)
        before = tree_digest(ckpt)
        try:
            model, _ = polar_jax.load(ckpt)
        except PolarError:
            tally.add("error")
        else:
            logits = np.asarray(model(jnp.asarray([[1, 2, 3, 5, 8]], jnp.int32)))
            np.testing.assert_array_equal(logits, reference)  # nothing that changes the model gets through
            tally.add("ok")
        assert tree_digest(ckpt) == before

    run()
    tally.report(50 * SCALE)


# ---- corrupted GGUF headers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("fuzz_gguf") / "m.gguf"
    write_gguf(path, "llama", d=32, ffn=64)
    reader = gguf.GGUFReader(path, "r")
    header_end = min(int(t.data_offset) for t in reader.tensors)
    del reader
    return path, header_end


def test_corrupted_gguf_headers(tmp_path, capsys, tiny_gguf, record_property):
    tally = Tally("corrupted GGUF header", record_property)
    path, header_end = tiny_gguf
    data = path.read_bytes()
    case = iter(range(10**9))

    @fuzz_settings(40)
    @given(st.one_of(st.tuples(st.just("truncate"), st.integers(0, header_end + 64)), corruptions(len(data), header_end)))
    def run(spec):
        bad = corrupt(data, spec)
        src = tmp_path / f"m{next(case)}.gguf"
        src.write_bytes(bad)
        code, _ = cli_case(capsys, ["convert", src, tmp_path / f"out{src.stem}"], tally)
        assert src.read_bytes() == bad
        if code == 0:
            finite_forward(polar_jax.load(tmp_path / f"out{src.stem}")[0])

    run()
    tally.report(40 * SCALE)


# ---- random flag values ------------------------------------------------------------------------------------
BAD_NUMBERS = ("0", "-1", "-0", "1.5", "abc", "", "nan", "inf", "-inf", "1e309", "99999999999999999999999", "0x10")
SWITCH = object()
# required flags, and those whose defaults mean real work (10 training epochs, a whole text file)
ALWAYS = {None, "--text", "--out", "--data", "--bundle", "--epochs", "--batches", "--max-tokens", "--max-new-tokens",
          "--seq-len"}



class Flag:
    """A flag (or, with name None, positional arguments) with its good and bad values."""

    def __init__(self, name: str | None, good=(), bad=BAD_NUMBERS, always: bool | None = None):
        self.name, self.good, self.bad = name, tuple(good), tuple(bad)
        self.always = name in ALWAYS if always is None else always  # positional and required: always given

    def argv(self, value) -> list[str]:
        if value is None:
            return []
        if value is SWITCH:
            return [self.name]
        values = list(value) if isinstance(value, tuple) else [value]
        return values if self.name is None else [self.name, *values]


def switch(name: str) -> Flag:
    return Flag(name, good=(SWITCH,), bad=())


# Paths are placeholders resolved per case (see `_resolve`): inputs of every kind, wrong kinds, output targets.
MODEL = [Flag("--model", good=("default", "@ckpt"), bad=("@missing", "@text", "@dir")),
         Flag("--dtype", good=("float32",), bad=("int8",)), switch("--no-verify")]
TEXT = Flag("--text", good=("@text",), bad=("@binary", "@dir", "@missing"))
BUNDLE = Flag("--sparsity", good=("default", "@bundle", "none"), bad=("@missing", "@dir", "@text"))
VERBS = {
    "generate": [
        Flag(None, good=(("hello",), ("The history of", "KING RICHARD :")), bad=(("",),)), *MODEL,
        Flag("--max-new-tokens", good=("2",)), Flag("--temperature", good=("0", "0.8")), Flag("--top-p", good=("0.9",)),
        Flag("--seed", good=("3",)), BUNDLE, Flag("--attn-density", good=("0.5",)),
        Flag("--policy", good=("heads", "auto"), bad=("sideways",)),
        Flag(None, good=(("--stream",), ("--json",)), bad=(("--stream", "--json"),), always=False)],
    "eval ppl": [
        TEXT, *MODEL, Flag("--seq-len", good=("16",)), Flag("--batch-size", good=("2",)),
        Flag("--max-tokens", good=("64",)), Flag("--mode", good=("dense", "router", "oracle"), bad=("exact",)), BUNDLE,
        Flag("--attn-density", good=("0.5",)), Flag("--mlp-recall", good=("0.99",), bad=(*BAD_NUMBERS, "0.5")),
        switch("--per-layer"), switch("--no-mlp"), switch("--json")],
    "collect": [
        TEXT, Flag("--out", good=("@fresh", "@old_collect"), bad=("@userdir", "@text", "@ckpt", "@bundle")), *MODEL,
        Flag("--seq-len", good=("16",)), Flag("--batch-size", good=("4",)), Flag("--max-tokens", good=("64",)),
        Flag("--chunk-tokens", good=("32",)), switch("--overwrite")],
    "train-routers": [
        Flag("--data", good=("@tiny_data",), bad=("@dir", "@missing", "@bundle")),
        Flag("--out", good=("@fresh", "@old_bundle"), bad=("@userdir", "@data", "@text", "@ckpt")),
        Flag("--rank", good=("8",)), Flag("--epochs", good=("1",)), Flag("--lr", good=("0.01",)),
        Flag("--batch-size", good=("512",)), Flag("--patience", good=("1",)), Flag("--val-fraction", good=("0.2",)),
        Flag("--max-train-tokens", good=("512",)), Flag("--attn-train-density", good=("0.5",)), switch("--overwrite")],
    "calibrate": [
        Flag("--bundle", good=("@bundle",), bad=("@dir", "@missing", "@data")),
        Flag("--data", good=("@data",), bad=("@dir", "@missing", "@bundle")),
        Flag("--out", good=("@fresh", "@old_bundle"), bad=("@userdir", "@data", "@text")),
        Flag("--recall", good=("0.9",)), Flag("--tile", good=("32",)), Flag("--batches", good=("2",)),
        Flag("--dense-threshold", good=("0.75",)), Flag("--layer-densities", good=("1,0.5,0.5,0.5",), bad=("1,2", "a,b")),
        switch("--overwrite")],
    "convert": [
        Flag(None, good=(("@hf",), ("@gguf",)), bad=(("@ckpt",), ("@missing",), ("@text",))),
        Flag(None, good=(("@fresh",), ("@old_ckpt",)), bad=(("@userdir",), ("@hf",), ("@text",), ("@bundle",))),
        Flag("--dtype", good=("float16", "bfloat16"), bad=("int4",)), switch("--overwrite")],
}

@st.composite
def command_lines(draw):
    """A verb and its flags. A third of the cases use good values only, a third has exactly one bad value,
    the rest anything (so successes, single mistakes and pile-ups are all exercised)."""
    verb = draw(st.sampled_from(sorted(VERBS)))
    flags = VERBS[verb]
    style = draw(st.sampled_from(["good", "one bad", "any"]))
    bad_one = draw(st.sampled_from([i for i, f in enumerate(flags) if f.bad]))
    argv = verb.split()
    for i, f in enumerate(flags):
        present = f.always or i == bad_one and style == "one bad" or draw(st.booleans())
        if not present:
            continue
        bad = (style == "one bad" and i == bad_one) or (style == "any" and f.bad and draw(st.integers(0, 3)) == 0)
        argv += f.argv(draw(st.sampled_from(f.bad if bad else f.good)))
    if style == "any" and draw(st.integers(0, 5)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--bogus", "-x", "--help"])))
    return argv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_hf):
    """Inputs of every kind the verbs read (copies: the package's own files are never handed out)."""
    root = tmp_path_factory.mktemp("fuzz_cli")
    text = root / "text.txt"
    text.write_text(require(SHARED / "data" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20000])
    (root / "binary.bin").write_bytes(bytes(range(256)) * 40)
    (root / "dir").mkdir()
    (root / "dir" / "notes.txt").write_text("a user's folder")
    shutil.copytree(DEFAULT_MODEL_DIR, root / "ckpt")
    shutil.copytree(DEFAULT_BUNDLE, root / "bundle")
    assert polar_jax.cli.main(["collect", "--text", str(text), "--out", str(root / "data"), "--seq-len", "32",
                               "--max-tokens", "2700", "--batch-size", "96"]) == 0
    # router training compiles per layer: its successful runs train on a 2-layer model (the embedded model's
    # tokenizer, random weights) to keep each run to seconds
    tiny = write_hf(root / "tiny_model", dict(TINY_OPT, vocab_size=4096, max_position_embeddings=128))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEFAULT_MODEL_DIR / name, tiny / name)
    assert polar_jax.cli.main(["collect", "--model", str(tiny), "--text", str(text), "--out", str(root / "tiny_data"),
                               "--seq-len", "32", "--max-tokens", "1024"]) == 0
    shutil.copytree(tiny_hf["llama"], root / "hf")
    write_gguf(root / "m.gguf", "llama", d=32, ffn=64)
    # earlier outputs of each kind, for --overwrite to replace
    shutil.copytree(root / "data", root / "old_collect")
    shutil.copytree(DEFAULT_BUNDLE, root / "old_bundle")
    assert polar_jax.cli.main(["convert", str(root / "hf"), str(root / "old_ckpt")]) == 0
    return root


def _resolve(argv: list[str], root: Path, case: int) -> list[str]:
    fresh = root / f"fresh{case}"
    names = {"@text": root / "text.txt", "@binary": root / "binary.bin", "@dir": root / "dir", "@missing": root / "nope",
             "@ckpt": root / "ckpt", "@bundle": root / "bundle", "@data": root / "data", "@hf": root / "hf",
             "@gguf": root / "m.gguf", "@userdir": root / "dir", "@fresh": fresh, "@old_collect": root / "old_collect",
             "@old_bundle": root / "old_bundle", "@old_ckpt": root / "old_ckpt", "@tiny_data": root / "tiny_data"}
    return [str(names.get(a, a)) for a in argv]


def _check_success(argv: list[str], out: str) -> None:
    if "--json" in argv and "--help" not in argv and "ppl" in argv:
        assert np.isfinite(json.loads(out.strip().splitlines()[-1])["ppl"])
    if "--json" in argv and "--help" not in argv and "generate" in argv:
        assert np.isfinite(json.loads(out)["tokens_per_s"])


def test_random_command_lines(workspace, capsys, record_property):
    """Random verbs, flags and values (most of them wrong) against inputs of every kind. Outputs may land in
    a fresh folder or an earlier output of the same kind; every input stays byte-identical."""
    tally = Tally("random command lines", record_property)
    inputs = ("text.txt", "binary.bin", "dir", "ckpt", "hf", "m.gguf")
    package = tree_digest(DEFAULT_MODEL_DIR) | tree_digest(DEFAULT_BUNDLE)
    case = iter(range(10**9))
    timing = []

    @fuzz_settings(50)
    @given(command_lines())
    def run(argv):
        argv = _resolve(argv, workspace, next(case))
        before = {name: tree_digest(workspace / name) for name in inputs}
        t0 = time.perf_counter()
        code, out = cli_case(capsys, argv, tally)
        timing.append((time.perf_counter() - t0, argv))
        if code == 0:
            _check_success(argv, out)
        # the bundle, the data and the old_* outputs may be replaced by an output of their own kind (calibrate
        # in place, --overwrite); these are only ever read
        assert {name: tree_digest(workspace / name) for name in inputs} == before, argv
        assert (workspace / "data" / "collect.json").is_file() and (workspace / "bundle" / "sparsity.json").is_file()

    run()
    assert tree_digest(DEFAULT_MODEL_DIR) | tree_digest(DEFAULT_BUNDLE) == package
    for dt, argv in sorted(timing, key=lambda x: x[0])[-12:]:
        print(f"{dt:6.2f}s {' '.join(a.replace(str(workspace), '') for a in argv)}")
    tally.report(50 * SCALE)
