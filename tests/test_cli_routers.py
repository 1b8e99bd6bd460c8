"""The router pipeline through the CLI: collect -> train-routers -> calibrate -> eval ppl (--json), and
clear `error: ...` exits for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import polar_jax
from conftest import SHARED, model_dir, require
from polar_jax.cli import main
from polar_jax.eval.agreement import greedy_agreement
from polar_jax.eval.perplexity import perplexity
from polar_jax.eval.sparse_ppl import sparse_perplexity
from polar_jax.routers import load_bundle, load_sparsity
from polar_jax.routers.calibrate import calibrate
from polar_jax.routers.collect import CollectedData, read_text_tokens
from polar_jax.routers.sparsify import router_selector

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
    raw = root / "raw"
    assert main(["train-routers", "--data", str(data), "--out", str(raw), "--rank", "16", "--epochs", "2",
                 "--batch-size", "256", "--val-fraction", "0.2"]) == 0
    assert main(["calibrate", "--bundle", str(raw), "--data", str(data), "--out", str(bundle), "--recall", "0.9",
                 "0.99", "--batches", "8"]) == 0
    return model, data, bundle, raw


def test_cli_calibration_equals_the_api(pipeline):
    """`calibrate` on the command line stores exactly what the API computes from the same bundle and data."""
    model, data, bundle, raw = pipeline
    api = calibrate(load_bundle(raw), CollectedData(data), recalls=(0.9, 0.99), n_batches=8, log=lambda s: None,
                    progress=False)
    cli = load_bundle(bundle)
    assert cli.config == api.config
    assert [t.recall for t in cli.config.mlp_tables] == [0.9, 0.99]
    assert cli.config.train["metrics"]["attn.1"]["history"]  # per-epoch metrics recorded


def _json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_pipeline_json_perplexity_equals_the_api(pipeline, capsys, wikitext_test):
    """Each `eval ppl --json` number equals `sparse_perplexity` / `perplexity` called on the same inputs."""
    model, data, bundle, _ = pipeline
    lm, tok = polar_jax.load_hf(model)
    tokens = np.asarray(read_text_tokens(tok, [wikitext_test], 1024)[0])
    sb = load_sparsity(bundle, lm)
    results = {}
    for mode, per_layer, adaptive in [("router", False, False), ("oracle", False, False), ("router", True, False),
                                      ("router", False, True)]:
        code, out, _ = _run(capsys, "eval", "ppl", "--model", model, "--sparsity", bundle, "--mode", mode,
                            "--attn-density", "0.5", "--mlp-recall", "0.9", "--text", wikitext_test,
                            "--max-tokens", "1024", "--seq-len", "128", "--batch-size", "4", "--json",
                            *(["--per-layer"] if per_layer else []), *(["--adaptive"] if adaptive else []))
        assert code == 0
        res = _json_line(out)
        api = sparse_perplexity(lm, tokens, sb, mode, 0.5, 0.9, per_layer, seq_len=128, batch_size=4,
                                progress=False, adaptive=adaptive)
        assert (res["tokens"], res["predictions"], res["mode"], res["adaptive"]) == (1024, api.predictions, mode,
                                                                                    adaptive)
        assert res["ppl"] == pytest.approx(api.ppl, rel=1e-6), (mode, per_layer, adaptive)
        results[(mode, per_layer, adaptive)] = res["ppl"]
    assert results[("oracle", False, False)] != results[("router", False, False)]
    assert results[("router", False, True)] != results[("router", False, False)]  # the flag reaches the routers
    code, _, err = _run(capsys, "eval", "ppl", "--model", model, "--sparsity", bundle, "--mode", "oracle",
                        "--adaptive", "--text", wikitext_test)
    assert code == 2 and "--adaptive" in err and "router" in err
    code, out, _ = _run(capsys, "eval", "ppl", "--model", model, "--sparsity", "none", "--text", wikitext_test,
                        "--max-tokens", "1024", "--seq-len", "128", "--json")
    dense = _json_line(out)
    assert dense["mode"] == "dense"
    assert dense["ppl"] == pytest.approx(perplexity(lm, tokens, seq_len=128, batch_size=8, progress=False).ppl,
                                         rel=1e-6)
    assert dense["ppl"] < results[("oracle", False, False)] and dense["ppl"] < results[("router", False, False)]


def test_cli_agreement_json_equals_the_api(pipeline, capsys, wikitext_test):
    model, _, bundle, _ = pipeline
    code, out, _ = _run(capsys, "eval", "agreement", "--model", model, "--sparsity", bundle, "--attn-density",
                        "0.25", "--mlp-recall", "0.9", "--text", wikitext_test, "--max-tokens", "2000",
                        "--prompts", "3", "--prompt-len", "16", "--new-tokens", "12", "--seed", "4", "--json")
    assert code == 0
    lm, tok = polar_jax.load_hf(model)
    tokens = read_text_tokens(tok, [wikitext_test], 2000)[0]
    sel = router_selector(load_sparsity(bundle, lm), 0.25, 0.9)
    api = greedy_agreement(lm, tokens, sel, n_prompts=3, prompt_len=16, new_tokens=12, seed=4)
    assert _json_line(out) == json.loads(json.dumps(api))


def test_cli_bad_input_exits_with_clear_errors(pipeline, capsys, tmp_path, wikitext_test):
    model, data, bundle, _ = pipeline
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
