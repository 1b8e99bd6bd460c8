"""The router pipeline through the CLI: collect -> train-routers -> calibrate -> eval ppl (--json), and
clear `error: ...` exits for bad input."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED, model_dir, require
from polar_jax.cli import main

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
SHAKES = SHARED / "data" / "tinyshakespeare" / "input.txt"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One small end-to-end run on polar-tiny-opt (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("cli")
    model = model_dir("polar-tiny-opt")
    data, bundle = root / "data", root / "bundle"
    assert main(["collect", "--model", str(model), "--text", str(require(VALID)), str(require(SHAKES)),
                 "--out", str(data), "--seq-len", "64", "--max-tokens", "6400", "--batch-size", "8"]) == 0
    assert main(["train-routers", "--data", str(data), "--out", str(bundle), "--rank", "16", "--epochs", "2",
                 "--batch-size", "256", "--val-fraction", "0.2"]) == 0
    assert main(["calibrate", "--bundle", str(bundle), "--data", str(data), "--recall", "0.9", "0.99",
                 "--batches", "8"]) == 0
    return model, data, bundle


def test_pipeline_and_json_perplexity(pipeline, capsys, wikitext_test):
    model, data, bundle = pipeline
    meta = json.loads((bundle / "sparsity.json").read_text())["config"]
    assert [t["recall"] for t in meta["mlp_tables"]] == [0.9, 0.99]
    assert meta["train"]["metrics"]["attn.1"]["history"]  # per-epoch metrics recorded
    results = {}
    for mode, extra in [("router", []), ("oracle", []), ("router", ["--per-layer"])]:
        code, out, _ = _run(capsys, "eval", "ppl", "--model", model, "--sparsity", bundle, "--mode", mode,
                            "--attn-density", "0.5", "--mlp-recall", "0.9", "--text", wikitext_test,
                            "--max-tokens", "1024", "--seq-len", "128", "--batch-size", "4", "--json", *extra)
        assert code == 0
        res = json.loads(out.strip().splitlines()[-1])
        assert res["tokens"] == 1024 and res["ppl"] > 1
        results[mode + "".join(extra)] = res["ppl"]
    code, out, _ = _run(capsys, "eval", "ppl", "--model", model, "--sparsity", "none", "--text", wikitext_test,
                        "--max-tokens", "1024", "--seq-len", "128", "--json")
    dense = json.loads(out.strip().splitlines()[-1])["ppl"]
    assert dense < results["oracle"] and dense < results["router"]


def test_cli_bad_input_exits_with_clear_errors(pipeline, capsys, tmp_path, wikitext_test):
    model, data, bundle = pipeline
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Too short .")
    cases = [
        (["eval", "ppl", "--model", model, "--sparsity", bundle, "--text", empty], "is empty"),
        (["eval", "ppl", "--model", model, "--sparsity", bundle, "--text", short], "fewer than one window"),
        (["eval", "ppl", "--model", model, "--sparsity", bundle, "--text", wikitext_test, "--attn-density", "1.5",
          "--max-tokens", "600"], "(0, 1]"),
        (["eval", "ppl", "--model", model, "--sparsity", bundle, "--text", tmp_path / "nope.txt"], "does not exist"),
        (["eval", "ppl", "--model", model_dir("tiny-opt"), "--sparsity", bundle, "--text", wikitext_test],
         "another model"),
        (["eval", "ppl", "--model", model, "--sparsity", tmp_path / "nobundle", "--text", wikitext_test], "does not exist"),
        (["collect", "--model", model, "--text", VALID, "--out", data], "overwrite"),
        (["train-routers", "--data", tmp_path / "nodata", "--out", tmp_path / "b"], "not a collection folder"),
        (["calibrate", "--bundle", bundle, "--data", data, "--recall", "0"], "(0, 1]"),
    ]
    for argv, msg in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("error: ") and msg in err, (argv, err)
