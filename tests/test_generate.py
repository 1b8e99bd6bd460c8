import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill, split_model
from polar_jax.errors import InputError
from polar_jax.routers.sparsify import router_selector
from conftest import load_cached


@pytest.fixture(scope="module")
def default():
    return polar_jax.load("default")


def greedy_by_full_forward(model, prompt, n):
    """Reference: re-run the whole sequence for every token (no cache). The model is causal, so a fixed
    zero-padded buffer read at the last real position gives the same logits with one compilation."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        buf[0, i] = int(jnp.argmax(forward(state, jnp.asarray(buf))[0, i - 1]))
    return buf[0, len(prompt):].tolist()


def test_cached_generation_equals_full_forward(default):
    model, tok = default
    prompt = tok.encode("In the early years of the war , the army")
    out = polar_jax.generate(model, [prompt], 12, eos_token_id=())
    assert out.shape == (1, 12) and out.dtype == np.int32
    assert out[0].tolist() == greedy_by_full_forward(model, prompt, 12)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_ragged_batch_equals_each_prompt_alone(name):
    model, tok = load_cached(name)
    texts = ["The history of the city", "KING RICHARD : I will not stay here", "It was", "The album was released in 2004 by the band"]
    prompts = [tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == 4
    batch = polar_jax.generate(model, prompts, 16, eos_token_id=())
    for p, row in zip(prompts, batch):
        np.testing.assert_array_equal(row, polar_jax.generate(model, [p], 16, eos_token_id=())[0])


def test_array_and_list_prompts_agree(default):
    model, _ = default
    arr = np.random.default_rng(0).integers(3, 4000, size=(3, 7)).astype(np.int32)
    np.testing.assert_array_equal(polar_jax.generate(model, arr, 5), polar_jax.generate(model, arr.tolist(), 5))


def first_eos(row, eos) -> int | None:
    hits = np.flatnonzero(np.isin(row, list(eos)))
    return int(hits[0]) if hits.size else None


def with_eos(free: np.ndarray, eos, pad: int) -> np.ndarray:
    """Reference: each row of an EOS-free greedy run cut after its first EOS and padded."""
    out = free.copy()
    for row in out:
        j = first_eos(row, eos)
        if j is not None:
            row[j + 1:] = pad
    return out


@jax.tree_util.register_pytree_node_class
class StepCounter:
    """A dense DecodeSelector that records, for each decode step actually run, the rows it decodes as live
    (a host callback per step)."""

    calls: list = []

    def attention(self, layer, router_input, live):
        if layer == 0:
            jax.debug.callback(lambda rows: StepCounter.calls.append(np.asarray(rows).tolist()), live, ordered=True)
        return None

    def mlp(self, layer, router_input, live):
        return None

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls()


EOS_TEXTS = ["The history of the city", "KING RICHARD :", "The album was released", "It was"]


@pytest.fixture(scope="module")
def free_run(default):
    model, tok = default
    prompts = [tok.encode(t) for t in EOS_TEXTS]
    return prompts, polar_jax.generate(model, prompts, 12, eos_token_id=())


def test_eos_stops_each_row_and_pads_it(default, free_run):
    """One EOS id that rows emit at different steps and one row never emits: every row is cut after its
    own first EOS, and the rows still running keep generating (the loop waits for all of them)."""
    model, _ = default
    prompts, free = free_run
    pad = model.config.pad_id
    chosen = None
    for t in sorted(set(free.reshape(-1).tolist()) - {pad}):
        firsts = [first_eos(r, {t}) for r in free]
        hit = [f for f in firsts if f is not None]
        if None in firsts and len(set(hit)) >= 2 and min(hit) < 8:
            chosen = t
            break
    assert chosen is not None, "no token ends rows at different steps; pick other prompts"
    out = polar_jax.generate(model, prompts, 12, eos_token_id=chosen)
    np.testing.assert_array_equal(out, with_eos(free, {chosen}, pad))
    stream = np.stack(list(polar_jax.generate_stream(model, prompts, 12, eos_token_id=chosen)), axis=1)
    np.testing.assert_array_equal(stream, out)  # a row never finishes: the stream runs to the end


def test_several_eos_ids_stop_the_loop_once_all_rows_are_done(default, free_run):
    """Two EOS ids, neither of which ends every row alone: together they do, and then `generate` stops
    decoding (counted) and `generate_stream` stops yielding. A finished row is not live in the steps after
    its EOS (it reads no KV and is not in the MLP union), in both loops."""
    model, _ = default
    prompts, free = free_run
    pad = model.config.pad_id
    tokens = sorted(set(free.reshape(-1).tolist()) - {pad})
    best = None
    for i, a in enumerate(tokens):
        for b in tokens[i + 1:]:
            firsts = [first_eos(r, {a, b}) for r in free]
            alone = [any(first_eos(r, {t}) is None for r in free) for t in (a, b)]
            if None not in firsts and all(alone) and max(firsts) < 10:
                if best is None or max(firsts) < best[0]:
                    best = (max(firsts), (a, b))
    assert best is not None, "no pair of tokens ends every row; pick other prompts"
    last, eos = best
    StepCounter.calls.clear()
    out = polar_jax.generate(model, prompts, 12, eos_token_id=eos, selector=StepCounter())
    jax.effects_barrier()
    np.testing.assert_array_equal(out, with_eos(free, set(eos), pad))
    assert len(StepCounter.calls) == last, "decode steps run: the loop must stop when the last row is done"
    ends = [first_eos(r, set(eos)) for r in free]
    live = [[end >= i for end in ends] for i in range(1, last + 1)]  # decode step i makes token i
    assert StepCounter.calls == live
    assert any(not all(step) for step in live)  # some row really finishes before the last one
    StepCounter.calls.clear()
    steps = list(polar_jax.generate_stream(model, prompts, 12, eos_token_id=list(eos), selector=StepCounter()))
    jax.effects_barrier()
    assert StepCounter.calls == live
    assert len(steps) == last + 1
    np.testing.assert_array_equal(np.stack(steps, axis=1), out[:, : last + 1])
    assert (out[:, last + 1:] == pad).all()


def test_stream_matches_generate(default):
    model, tok = default
    prompts = [tok.encode("KING RICHARD :"), tok.encode("The album")]
    # the last case leaves the seed to each function's default: they must be the same
    for kw in (dict(), dict(temperature=0.9, top_p=0.9, seed=3), dict(temperature=0.9)):
        full = polar_jax.generate(model, prompts, 8, eos_token_id=(), **kw)
        steps = list(polar_jax.generate_stream(model, prompts, 8, eos_token_id=(), **kw))
        np.testing.assert_array_equal(np.stack(steps, axis=1), full)


def test_sampling_is_seeded_and_top_p_limits(default):
    model, tok = default
    prompt = [tok.encode("The history of")] * 4
    a = polar_jax.generate(model, prompt, 12, temperature=1.0, seed=1, eos_token_id=())
    b = polar_jax.generate(model, prompt, 12, temperature=1.0, seed=1, eos_token_id=())
    c = polar_jax.generate(model, prompt, 12, temperature=1.0, seed=2, eos_token_id=())
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) > 1  # rows of one batch draw different samples
    # A tiny nucleus keeps only the top token: sampling collapses to greedy.
    greedy = polar_jax.generate(model, prompt, 12, eos_token_id=())
    np.testing.assert_array_equal(polar_jax.generate(model, prompt, 12, temperature=1.0, top_p=1e-6, seed=5,
                                                     eos_token_id=()), greedy)


def test_decode_step_updates_cache_in_place(default):
    model, _ = default
    graphdef, state = split_model(model)
    cache = KVCache.create(model.config, 2, 64, model.dtype)
    _, cache = prefill(graphdef, state, jnp.ones((2, 16), jnp.int32), jnp.array([5, 16], jnp.int32), cache)
    before = [x.unsafe_buffer_pointer() for x in cache.k + cache.v]
    old = cache
    _, cache = decode_step(graphdef, state, cache, jnp.array([7, 9], jnp.int32))
    assert [x.unsafe_buffer_pointer() for x in cache.k + cache.v] == before
    assert old.k[0].is_deleted()
    np.testing.assert_array_equal(np.asarray(cache.lengths), [6, 17])


def test_sliding_window_model_decodes_past_its_window():
    model, _ = load_cached("mistral-swa")
    assert model.config.sliding_window is not None
    prompt = list(range(3, 3 + 11))
    n = 2 * model.config.sliding_window
    assert polar_jax.generate(model, [prompt], n, eos_token_id=())[0].tolist() == greedy_by_full_forward(model, prompt, n)


@pytest.mark.parametrize(
    "prompts, kw, words",
    [
        ([], {}, "empty prompt list"),
        ([[5, 6], []], {}, "prompt 1 is empty"),
        ([[5, 4096]], {}, "outside the vocabulary"),
        ([[-1, 3]], {}, "outside the vocabulary"),
        ([[5]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[5]], {"max_new_tokens": -3}, "max_new_tokens"),
        ([[5] * 40], {"cache_size": 32}, "longer than the cache"),
        ([[5] * 20], {"cache_size": 32, "max_new_tokens": 20}, "needs 40 cache positions"),
        ([[5] * 500], {"max_new_tokens": 20}, "exceeds the model's 512 positions"),
        ([[5]], {"temperature": -1.0}, "temperature"),
        ([[5]], {"top_p": 0.0}, "top_p"),
        # the CLI's limits hold in the API too (polar_jax.validate): no bool / float / string counts, no raw
        # TypeError or OverflowError from a string temperature or a seed numpy and jax cannot take
        ([[5]], {"max_new_tokens": True}, "max_new_tokens"),
        ([[5]], {"max_new_tokens": 2.0}, "max_new_tokens"),
        ([[5]], {"temperature": "0.5"}, "temperature"),
        ([[5]], {"temperature": float("nan")}, "temperature"),
        ([[5]], {"top_p": "1"}, "top_p"),
        ([[5]], {"seed": -1}, "seed"),
        ([[5]], {"seed": 2**70}, "seed"),
        ([[5]], {"seed": 1.5}, "seed"),
        ([[5]], {"cache_size": 2.5}, "cache_size"),
        ([[5]], {"cache_size": 0}, "cache_size"),
        ("hello", {}, "encode text"),
        (np.zeros((2, 3, 4), np.int32), {}, r"\[batch, tokens\]"),
    ],
)
def test_bad_generation_input(default, prompts, kw, words):
    model, _ = default
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(InputError, match=words):
        polar_jax.generate(model, prompts, **kw)
    with pytest.raises(InputError, match=words):
        next(polar_jax.generate_stream(model, prompts, **kw))


def test_cli_demo_and_generate_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "polar_jax.cli", *a], capture_output=True, text=True, timeout=600)
    demo = run("demo", "--max-new-tokens", "8")
    assert demo.returncode == 0, demo.stderr
    assert "tokens/s" in demo.stdout and "[KING RICHARD :]" in demo.stdout
    bad = run("generate", "hello", "--max-new-tokens", "0")
    assert bad.returncode == 2 and "max_new_tokens" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("generate", "hello", "--model", "/nonexistent/model")
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_cli_sparse_generation(default):
    """The command line decodes sparsely with the bundle's routers when the policy is forced (auto runs dense on a
    CPU, where no speedup is measured): its continuation is the API's (sparse)
    one, which differs from the dense one. (The printed layout is free text; only the continuation's text
    is looked for in it.)"""
    run = lambda *a: subprocess.run([sys.executable, "-m", "polar_jax.cli", *a], capture_output=True, text=True, timeout=600)
    prompt = "The album was released"
    ok = run("generate", prompt, "--sparsity", "default", "--attn-density", "0.25", "--policy", "heads",
             "--max-new-tokens", "12")
    assert ok.returncode == 0, ok.stderr
    model, tok = default
    selector = router_selector(polar_jax.load_sparsity("default", model), attn_density=0.25)
    sparse = polar_jax.generate(model, [tok.encode(prompt)], 12, selector=selector)[0]
    dense = polar_jax.generate(model, [tok.encode(prompt)], 12)[0]
    assert tok.decode(sparse) != tok.decode(dense), "pick a setting where sparse and dense decoding differ"
    assert tok.decode(sparse) in ok.stdout and tok.decode(dense) not in ok.stdout
    bad = run("generate", "hello", "--sparsity", "/nonexistent/bundle")
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_adaptive_head_budgets(default, capsys):
    """`generate --adaptive` decodes with input-adaptive head budgets: its tokens are the API's
    (adaptive=True), which differ from the fixed budgets' here; the flag needs --sparsity."""
    from polar_jax.cli import main

    model, tok = default
    prompts = ["The album was released", "KING RICHARD : I will"]
    args = ["generate", *prompts, "--sparsity", "default", "--attn-density", "0.25", "--policy", "heads",
            "--max-new-tokens", "12", "--json"]
    got = {}
    for adaptive in (False, True):
        assert main(args + (["--adaptive"] if adaptive else [])) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["adaptive"] is adaptive and report["decode"] == "sparse"
        got[adaptive] = [r["ids"] for r in report["rows"]]
        api = polar_jax.generate(model, [tok.encode(p) for p in prompts], 12, sparsity="default", attn_density=0.25,
                                 policy="heads", adaptive=adaptive, eos_token_id=())
        for row, want in zip(got[adaptive], np.asarray(api)):
            assert row == [int(t) for t in want[: len(row)]]
    assert got[True] != got[False], "pick a setting where adaptive and fixed budgets differ"
    assert main(["generate", "hello", "--adaptive"]) == 2
    assert "--adaptive needs --sparsity" in capsys.readouterr().err


def test_token_loop_parallel_path_and_dead_rows(default, free_run):
    """The token loop as the tensor-parallel step runs it (a `Parallel` of one shard, so no collective
    needs a mesh) equals the plain loop; a row marked dead (padding of the batch) emits only padding, and a
    row whose first token is EOS is done at once."""
    from polar_jax.decode import _eos_ids, _token_loop
    from polar_jax.tensor_parallel import Parallel

    model, _ = default
    prompts, free = free_run
    pad = model.config.pad_id
    n, b = 6, len(prompts)
    t = max(len(p) for p in prompts)
    tokens = jnp.asarray([p + [pad] * (t - len(p)) for p in prompts], jnp.int32)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    eos = _eos_ids(model, int(free[0, 0]))  # row 0 ends at its first token

    def run(parallel=None, dead=None):
        cache = KVCache.create(model.config, b, t + n + 8, model.dtype)
        return np.asarray(_token_loop(model, tokens, lengths, jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0),
                                      jnp.asarray(eos), pad, None, cache, max_new_tokens=n, greedy=True,
                                      attn_impl="xla", mlp_impl="xla", parallel=parallel, dead=dead))

    plain = run()
    np.testing.assert_array_equal(plain, with_eos(free[:, :n], {int(free[0, 0])}, pad))
    assert (plain[0, 1:] == pad).all() and (plain[1:, 1:] != pad).any()
    dead = jnp.asarray([False] * (b - 1) + [True])
    got = run(Parallel(tensor=1, data=1), dead)
    np.testing.assert_array_equal(got[: b - 1], plain[: b - 1])
    assert (got[b - 1, 1:] == pad).all(), "a dead row decoded"
