"""The lm-evaluation-harness adapter against direct computations on the embedded model (fp32):
log-likelihoods = log-softmax sums of `model(input_ids)`, rolling = lm-eval's window protocol restated,
generate_until = `generate` + the same stop strings, sparse = the real sparse decode path per request."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import polar_jax
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill
from polar_jax.eval.lm_eval_tasks import TASKS_DIR
from polar_jax.routers.sparsify import router_selector

try:  # a missing lm-eval is a failure, not a skip
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager
except ImportError as e:  # pragma: no cover - the test extra installs it
    pytest.fail(f"lm-eval is required for these tests (pip install '.[test]'): {e}", pytrace=False)

from polar_jax.eval.lm_eval_adapter import PolarLM  # noqa: E402  (needs lm_eval)

TOL = 1e-4


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def default():
    model, tok = polar_jax.load("default")
    return model, tok, polar_jax.load_sparsity("default", model)


def _ll_requests(n_questions: int) -> list[tuple[str, str]]:
    """(context, continuation) pairs as lm-eval makes them for the multiple-choice task."""
    return [(q["context"], " " + c) for q in _rows("next_sentence.jsonl")[:n_questions] for c in q["choices"]]


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@nnx.jit
def _log_softmax(model, ids):
    return jax.nn.log_softmax(model(ids).astype(jnp.float32), axis=-1)


def _logp(model, ids: list[int], pad: int = 256) -> np.ndarray:
    """log_softmax(model(ids)) [T, V]; the input is right-padded to one length (one compile), which cannot
    change the logits of the real positions of a causal model."""
    padded = np.zeros((1, pad), np.int32)
    padded[0, : len(ids)] = ids
    return np.asarray(_log_softmax(model, jnp.asarray(padded))[0, : len(ids)], np.float64)


def _direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = ctx + cont
    logp = _logp(model, ids)
    pos = range(len(ctx) - 1, len(ids) - 1)
    total = sum(logp[p, ids[p + 1]] for p in pos)
    greedy = all(int(np.argmax(logp[p])) == ids[p + 1] for p in pos)
    return float(total), greedy


def test_loglikelihood_equals_direct_log_softmax(default):
    model, tok, _ = default
    pairs = _ll_requests(6)
    # a continuation that is the greedy token, so is_greedy is checked in both directions
    ctx = pairs[0][0]
    best = int(jnp.argmax(model(jnp.asarray([tok.encode(ctx)]))[0, -1]))
    pairs.append((ctx, tok.decode([best])))
    got = PolarLM(model=model, tokenizer=tok, batch_size=5).loglikelihood(_instances("loglikelihood", pairs))
    for (c, x), (lp, greedy) in zip(pairs, got):
        c_ids = tok.encode(c)
        want = _direct(model, c_ids, tok.encode(c + x)[len(c_ids):])
        assert abs(lp - want[0]) < TOL, (lp, want)
        assert greedy == want[1]
    assert got[-1][1] and not all(g for _, g in got[:-1])


def _rolling_reference(model, tokens: list[int], prefix: int, max_len: int) -> float:
    """lm-eval's rolling protocol restated: predictions in chunks of max_len, each chunk seeing the max_len
    tokens before its last prediction (the first token is predicted from the prefix token)."""
    seq = [prefix] + tokens  # tokens[j] sits at seq[j + 1]
    total = 0.0
    for lo in range(0, len(tokens), max_len):
        hi = min(lo + max_len, len(tokens))
        first = max(0, hi - max_len)
        logp = _logp(model, seq[first:hi], pad=512)
        total += sum(logp[j - first, tokens[j]] for j in range(lo, hi))
    return total


def test_loglikelihood_rolling_equals_window_protocol(default):
    model, tok, _ = default
    texts = [r["text"] for r in _rows("wikitext_paragraphs.jsonl")[:3]]
    lm = PolarLM(model=model, tokenizer=tok, batch_size=4, max_length=48)  # several windows per paragraph
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    for text, lp in zip(texts, got):
        tokens = tok.encode(text)
        assert len(tokens) > 2 * 48
        assert abs(lp - _rolling_reference(model, tokens, lm.prefix_token_id, 48)) < TOL


def _decode_path_loglik(model, ctx: list[int], cont: list[int], selector) -> float:
    """The real system for one request: dense prefill of the context, then each continuation token as a
    (sparse) decode step, teacher-forced."""
    graphdef, state = nnx.split(model)
    cache = KVCache.create(model.config, 1, 128, model.dtype)
    logits, cache = prefill(graphdef, state, jnp.asarray([ctx]), jnp.asarray([len(ctx)], jnp.int32), cache)
    total = 0.0
    for i, t in enumerate(cont):
        total += float(jax.nn.log_softmax(logits[0].astype(jnp.float32))[t])
        if i + 1 < len(cont):
            logits, cache = decode_step(graphdef, state, cache, jnp.asarray([t], jnp.int32), selector)
    return total


def test_sparse_scores_equal_the_sparse_decode_path(default):
    model, tok, bundle = default
    pairs = _ll_requests(2)[::2]  # two contexts of different lengths in one batch, two choices each
    lm = PolarLM(model=model, tokenizer=tok, sparsity=bundle, attn_density=0.5, batch_size=8)
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    dense = PolarLM(model=model, tokenizer=tok, batch_size=8).loglikelihood(_instances("loglikelihood", pairs))
    selector = router_selector(bundle, 0.5, 0.99)
    gaps = []
    for (c, x), (lp, _), (dlp, _) in zip(pairs, got, dense):
        c_ids = tok.encode(c)
        want = _decode_path_loglik(model, c_ids, tok.encode(c + x)[len(c_ids):], selector)
        assert abs(lp - want) < 2e-3, (lp, want)
        gaps.append(abs(lp - dlp))
    assert max(gaps) > 0.05  # sparsity is really on


def test_adaptive_budgets_reach_both_paths(default):
    """adaptive=true (a model_args string, as lm-eval passes it) gives the scoring sparsifier and the
    generation selector the bundle's input-adaptive head budgets; its scores are the decode path's with
    them; without a bundle it is an error."""
    model, tok, bundle = default
    lm = PolarLM(model=model, tokenizer=tok, sparsity=bundle, attn_density=0.5, adaptive="true", batch_size=8)
    want = bundle.config.adaptive_budgets(0.5)
    assert lm.sparsifier.budgets == want and lm.selector.budgets == want and any(b is not None for b in want)
    assert PolarLM(model=model, tokenizer=tok, sparsity=bundle, attn_density=0.5).selector.budgets is None
    pairs = _ll_requests(2)[::2]
    selector = router_selector(bundle, 0.5, 0.99, adaptive=True)
    for (c, x), (lp, _) in zip(pairs, lm.loglikelihood(_instances("loglikelihood", pairs))):
        c_ids = tok.encode(c)
        assert abs(lp - _decode_path_loglik(model, c_ids, tok.encode(c + x)[len(c_ids):], selector)) < 2e-3
    with pytest.raises(polar_jax.InputError, match="needs sparsity"):
        PolarLM(model=model, tokenizer=tok, adaptive=True)


def test_sparse_density_one_equals_dense(default):
    model, tok, bundle = default
    pairs = _ll_requests(3)
    dense = PolarLM(model=model, tokenizer=tok).loglikelihood(_instances("loglikelihood", pairs))
    full = PolarLM(model=model, tokenizer=tok, sparsity=bundle, attn_density=1.0, mlp=False)
    for (a, ga), (b, gb) in zip(dense, full.loglikelihood(_instances("loglikelihood", pairs))):
        assert abs(a - b) < 1e-5 and ga == gb


def _generate_reference(model, tok, context: str, n: int, stops: list[str], selector=None) -> str:
    row = polar_jax.generate(model, [tok.encode(context)], n, selector=selector)[0]
    eos = set(model.config.eos_token_ids)
    cut = next((i for i, t in enumerate(row) if int(t) in eos), len(row))
    text = tok.decode(row[:cut])
    for s in stops:
        text = text.split(s)[0]
    return text


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_generate_until_equals_generate(default, sparse):
    model, tok, bundle = default
    qs = _rows("next_sentence.jsonl")[:2]
    stops = [" .", "\n"]
    reqs = [(q["context"], {"until": stops, "max_gen_toks": 12}) for q in qs]
    reqs.append((qs[0]["context"][:40], {"until": [" the"], "max_gen_toks": 12}))  # a shorter prompt, another stop
    kw = dict(sparsity=bundle, attn_density=0.5) if sparse else {}
    got = PolarLM(model=model, tokenizer=tok, batch_size=4, **kw).generate_until(_instances("generate_until", reqs))
    selector = router_selector(bundle, 0.5, 0.99) if sparse else None
    want = [_generate_reference(model, tok, c, g["max_gen_toks"], g["until"], selector) for c, g in reqs]
    assert got == want
    assert any(s in tok.decode(polar_jax.generate(model, [tok.encode(c)], 12)[0]) for c, _ in reqs[:2] for s in stops)


def test_simple_evaluate_accuracy_matches_scores(default):
    """The Python API on a local task: lm-eval's accuracy = argmax of the adapter's scores."""
    model, tok, _ = default
    lm = PolarLM(model=model, tokenizer=tok, batch_size=16)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=["polar_next_sentence"], limit=10, task_manager=tm)
    qs = _rows("next_sentence.jsonl")[:10]
    scores = lm.loglikelihood(_instances("loglikelihood", _ll_requests(10)), disable_tqdm=True)
    picks = np.argmax(np.array([s for s, _ in scores]).reshape(10, 4), axis=1)
    acc = float(np.mean(picks == np.array([q["label"] for q in qs])))
    assert res["results"]["polar_next_sentence"]["acc,none"] == pytest.approx(acc)


def test_cli_runs_a_local_task_and_prints_the_table(default, capsys):
    from polar_jax.cli import main

    model, tok, _ = default
    rc = main(["eval", "lm-eval", "--model_args", "model=default", "--tasks", "polar_wikitext_ppl", "--limit", "3",
               "--batch_size", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if "word_perplexity" in line)
    printed = float(row.split("|")[7])
    texts = [r["text"] for r in _rows("wikitext_paragraphs.jsonl")[:3]]
    ll = sum(_rolling_reference(model, tok.encode(t), model.config.bos_token_id, 512) for t in texts)
    words = sum(len(t.split()) for t in texts)
    assert printed == pytest.approx(float(np.exp(-ll / words)), rel=1e-3)


def test_cli_refuses_another_model(capsys):
    from polar_jax.cli import main

    assert main(["eval", "lm-eval", "--model", "hf", "--tasks", "polar_next_sentence"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_bos_and_prefix_tokens(default):
    model, tok, _ = default
    bos = model.config.bos_token_id
    lm = PolarLM(model=model, tokenizer=tok, add_bos_token=True)
    assert lm.tok_encode("The city") == [bos] + tok.encode("The city")
    assert lm.tok_encode("The city", add_special_tokens=False) == tok.encode("The city")
    assert PolarLM(model=model, tokenizer=tok, prefix_token_id=7).prefix_token_id == 7


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size="auto"), "batch_size"),
    (dict(model="/no/such/folder"), "does not exist"),
    (dict(sparsity="default", attn_density=3.0), "density"),
    (dict(max_length=1024), "positions"),
    (dict(mlp="maybe"), "true or false"),
])
def test_bad_arguments_raise_input_errors(default, kwargs, message):
    model, tok, _ = default
    base = {} if "model" in kwargs else dict(model=model, tokenizer=tok)
    with pytest.raises(polar_jax.InputError, match=message):
        PolarLM(**base, **kwargs)


def test_checkpoint_is_verified_unless_verify_is_false(tmp_path):
    """The adapter loads through the CLI's loader: a checkpoint whose weights no longer match weights_sha256
    is refused, and `verify=false` (a model_args string, like --no-verify) skips the check."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(polar_jax.checkpoint.DEFAULT_MODEL_DIR, ckpt)
    meta = json.loads((ckpt / "polar_jax.json").read_text())
    (ckpt / "polar_jax.json").write_text(json.dumps(dict(meta, weights_sha256="0" * 64)))
    with pytest.raises(polar_jax.CheckpointError, match="weights_sha256"):
        PolarLM(model=str(ckpt))
    assert PolarLM(model=str(ckpt), verify="false").model.config.vocab_size > 0
    with pytest.raises(polar_jax.InputError, match="verify"):
        PolarLM(model=str(ckpt), verify="sometimes")


def test_generation_longer_than_the_model_is_refused(default):
    model, tok, _ = default
    lm = PolarLM(model=model, tokenizer=tok)
    with pytest.raises(polar_jax.InputError, match="max_gen_toks"):
        lm.generate_until(_instances("generate_until", [("The city", {"until": ["."], "max_gen_toks": 512})]))
