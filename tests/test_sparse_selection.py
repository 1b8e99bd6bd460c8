"""Cheap selection rules, the step-level policy and the sparse-decoding API (issue 10, CPU checks)."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polar_jax
import polar_jax.bench.shapes
import polar_jax.policy
from conftest import load_cached
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill, split_model
from polar_jax.errors import InputError, PolarError
from polar_jax.policy import MARGIN, choose_variant
from polar_jax.routers import router_selector, router_sparsifier
from polar_jax.routers.calibrate import adaptive_thresholds, calibrate_mlp_thresholds
from polar_jax.routers.config import budget_bounds
from polar_jax.selection import AttentionSelection, MLPSelection, adaptive_counts, top_units, unit_mask
from test_sparse_eval import _tokens


@pytest.fixture(scope="module")
def opt_default():
    model, tok = load_cached("polar-tiny-opt")
    return model, tok, polar_jax.load_sparsity("default", model)


# ---- rules ------------------------------------------------------------------------------------------
def test_top_units_is_the_stable_descending_order_without_a_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, (50, 12)).astype(np.float32)  # many ties: the lower index wins
    want = np.argsort(-scores, axis=-1, kind="stable")
    for k in (1, 5, 12):
        np.testing.assert_array_equal(np.asarray(top_units(jnp.asarray(scores), k)), want[:, :k])
    counts = rng.integers(0, 13, 50)
    mask = np.zeros_like(scores)
    for i, c in enumerate(counts):
        mask[i, want[i, :c]] = 1
    np.testing.assert_array_equal(np.asarray(unit_mask(jnp.asarray(scores), jnp.asarray(counts))), mask)
    # The masked evaluation ranks [B, T, U] (routers.sparsify heads_mask): leading axes of any length.
    scores3 = rng.integers(0, 5, (2, 3, 12)).astype(np.float32)
    counts3 = rng.integers(0, 13, (2, 3))
    want3 = np.argsort(-scores3, axis=-1, kind="stable")
    mask3 = np.zeros_like(scores3)
    for i, j in np.ndindex(2, 3):
        mask3[i, j, want3[i, j, :counts3[i, j]]] = 1
    np.testing.assert_array_equal(np.asarray(unit_mask(jnp.asarray(scores3), jnp.asarray(counts3))), mask3)
    np.testing.assert_array_equal(np.asarray(top_units(jnp.asarray(scores3), 4)), want3[..., :4])


def test_adaptive_budgets_average_k_within_their_bounds():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4000, 16)) * rng.uniform(0.5, 2.0, (4000, 1))  # easy and hard tokens
    ts = adaptive_thresholds(logits, 0.5, 2.0)
    for k in (2, 5, 8):
        floor, cap = budget_bounds(k, 16, 0.5, 2.0)
        counts = np.asarray(adaptive_counts(jnp.asarray(logits), ts[k - 1], floor, cap))
        assert counts.min() >= floor and counts.max() <= cap
        assert abs(counts.mean() - k) < 0.05
        assert counts.std() > 0.3  # budgets really differ between tokens


def test_threshold_calibration_reaches_recall_on_fresh_batches():
    rng = np.random.default_rng(2)
    n, width = 3000, 256
    logits = rng.standard_normal((n, width)) * 2
    labels = (logits + rng.standard_normal((n, width))) > 2.0
    fit, test = slice(0, 2000), slice(2000, None)
    ts, caps, kept = calibrate_mlp_thresholds(logits[fit], labels[fit], 0.95, 32, (1, 8), n_batches=200)
    assert caps == sorted(caps) and all(c % 32 == 0 or c == width for c in caps)
    for b, t, cap in zip((1, 8), ts, caps):
        recalls, sizes = [], []
        for _ in range(400):
            idx = rng.choice(1000, b, replace=False) + 2000
            union, keep = labels[idx].any(0), logits[idx].max(0) > t
            if union.any():
                recalls.append((union & keep).sum() / union.sum())
            sizes.append(keep.sum())
        assert np.mean(recalls) > 0.93  # the target, up to the sampling noise of held-out batches
        assert np.mean(sizes) <= cap


def test_committed_bundle_tables_are_monotone_and_calibrated(opt_default):
    _, _, bundle = opt_default
    c = bundle.config
    assert c.attn_thresholds is not None and len(c.attn_thresholds) == c.num_layers
    for t in c.mlp_tables:
        assert t.has_thresholds
        for layer in range(c.num_layers):
            assert list(t.k[layer]) == sorted(t.k[layer]) and max(t.k[layer]) <= c.ffn
            assert list(t.capacity[layer]) == sorted(t.capacity[layer]) and max(t.capacity[layer]) <= c.ffn


# ---- the decode path equals the masked simulation ----------------------------------------------------------
@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_threshold_rule_and_adaptive_heads_decode_equals_masked(opt_default, impl, adaptive):
    model, _, bundle = opt_default
    toks = _tokens(model, 4, 14, seed=11)
    p = 6
    sp = router_sparsifier(bundle, 0.5, 0.99, start=p, adaptive=adaptive)
    assert sp.mlp_rule == "threshold"
    masked = model(toks, sparsifier=sp)[:, p - 1: -1]
    sel = router_selector(bundle, 0.5, 0.99, adaptive=adaptive, select_impl=impl)
    graphdef, state = split_model(model)
    cache = KVCache.create(model.config, 4, 32, model.dtype)
    logits, cache = prefill(graphdef, state, toks[:, :p], jnp.full((4,), p, jnp.int32), cache)
    out = [logits]
    for i in range(p, toks.shape[1] - 1):
        logits, cache = decode_step(graphdef, state, cache, toks[:, i], sel, impl, impl)
        out.append(logits)
    decoded = jnp.stack(out, axis=1)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(masked), rtol=2e-4, atol=2e-4)
    assert float(jnp.max(jnp.abs(decoded - model(toks)[:, p - 1: -1]))) > 1e-2


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_neuron_major_mlp_router_decodes_like_the_rank_major_one(opt_default, impl, monkeypatch):
    """MLP_ROUTER_LAYOUT "nr": the selector stores the second router matrix transposed ([N, rank]) and the
    union reads it so; the decode steps keep the same neurons and give the same logits."""
    from polar_jax.routers import sparsify

    model, _, bundle = opt_default
    toks = _tokens(model, 4, 10, seed=12)
    graphdef, state = split_model(model)
    outs = {}
    for layout in ("rn", "nr"):
        monkeypatch.setattr(sparsify, "MLP_ROUTER_LAYOUT", layout)
        sel = router_selector(bundle, 0.5, 0.99, select_impl=impl)
        b = next(m for m in sel.mlp_b if m is not None)
        assert sel.mlp_b_layout == layout and b.shape[0 if layout == "nr" else 1] == model.config.intermediate_size
        cache = KVCache.create(model.config, 4, 32, model.dtype)
        logits, cache = prefill(graphdef, state, toks[:, :6], jnp.full((4,), 6, jnp.int32), cache)
        steps = []
        for i in range(6, toks.shape[1]):
            logits, cache = decode_step(graphdef, state, cache, toks[:, i], sel, impl, impl)
            steps.append(np.asarray(logits))
        chosen = [sel.mlp(layer, jnp.asarray(np.random.default_rng(layer).standard_normal(
            (4, model.config.hidden_size)), jnp.float32), jnp.ones((4,), bool)) for layer in (1, 2)]
        outs[layout] = (np.stack(steps), [(np.asarray(c.idx), int(c.n_active)) for c in chosen])
    np.testing.assert_allclose(outs["nr"][0], outs["rn"][0], rtol=1e-5, atol=1e-5)
    for (a_idx, a_n), (b_idx, b_n) in zip(outs["nr"][1], outs["rn"][1]):
        assert a_n == b_n and 0 < a_n
        np.testing.assert_array_equal(a_idx, b_idx)


def test_sparse_generation_triton_equals_xla(opt_default):
    model, tok, _ = opt_default
    prompts = [tok.encode("The history of the city"), tok.encode("KING RICHARD : I will")]
    kw = dict(sparsity="default", policy="both", attn_density=0.5, eos_token_id=())
    a = polar_jax.generate(model, prompts, 10, impl="xla", **kw)
    b = polar_jax.generate(model, prompts, 10, impl="triton", **kw)
    np.testing.assert_array_equal(a, b)
    streamed = np.stack(list(polar_jax.generate_stream(model, prompts, 10, impl="xla", **kw)), axis=1)
    np.testing.assert_array_equal(streamed, a)


def test_density_one_equals_dense(opt_default):
    model, tok, bundle = opt_default
    c = bundle.config
    t = c.mlp_table(0.99)
    everything = dataclasses.replace(
        t, thresholds=tuple(tuple(-np.inf for _ in r) for r in t.thresholds),
        capacity=tuple(tuple(c.ffn for _ in r) for r in t.capacity))
    full = dataclasses.replace(bundle, config=dataclasses.replace(c, mlp_tables=(everything,),
                                                                  mlp_dense_threshold=1.01))
    sel = router_selector(full, attn_density=1.0, mlp_recall=0.99)
    assert sel.mlp_rule == "threshold" and sel.use_mlp  # the MLP really runs the selective path
    prompts = [tok.encode("In the early years of the war"), tok.encode("The album was")]
    np.testing.assert_array_equal(polar_jax.generate(model, prompts, 8, selector=sel, eos_token_id=()),
                                  polar_jax.generate(model, prompts, 8, eos_token_id=()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Neurons:
    idx: jax.Array
    n: jax.Array

    def attention(self, layer, router_input, live):
        return None

    def mlp(self, layer, router_input, live):
        return None if layer == 0 else MLPSelection.of(self.idx, self.n)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_sorted_and_unsorted_indices_give_the_same_step(opt_default, impl):
    model, _, _ = opt_default
    n = model.config.intermediate_size
    rng = np.random.default_rng(3)
    live = np.sort(rng.permutation(n)[: n // 3])
    junk = rng.integers(0, n, 7)  # slots past n_active must be ignored
    graphdef, state = split_model(model)
    toks = _tokens(model, 3, 6, seed=4)
    got = []
    for order in (live, rng.permutation(live)):
        sel = _Neurons(jnp.asarray(np.concatenate([order, junk]), jnp.int32), jnp.int32(live.size))
        cache = KVCache.create(model.config, 3, 16, model.dtype)
        _, cache = prefill(graphdef, state, toks[:, :5], jnp.full((3,), 5, jnp.int32), cache)
        logits, _ = decode_step(graphdef, state, cache, toks[:, 5], sel, impl, impl)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(got[0], got[1], atol=2e-5, rtol=0)
    dense = decode_step(graphdef, state, prefill(graphdef, state, toks[:, :5], jnp.full((3,), 5, jnp.int32),
                                                 KVCache.create(model.config, 3, 16, model.dtype))[1],
                        toks[:, 5], None, impl, impl)[0]
    assert np.max(np.abs(got[0] - np.asarray(dense))) > 1e-3  # the selection matters


# ---- the step-level policy ------------------------------------------------------------------------------
def _table(entries):
    return {"entries": [dict(device="GPU X", model_class=cls, shape="s", batch=b, context=c, speedup=s)
                        for cls, b, c, s in entries]}


def test_auto_never_picks_a_variant_its_table_says_is_slower():
    cfg = load_cached("polar-tiny-opt")[0].config
    table = _table([("relu-mha", 1, 2048, {"dense": 1.0, "heads": 0.9, "mlp": 1.3, "both": 1.25}),
                    ("relu-mha", 32, 2048, {"dense": 1.0, "heads": 1.6, "mlp": 0.99, "both": 1.8}),
                    ("relu-mha", 256, 2048, {"dense": 1.0, "heads": 0.97, "mlp": 0.9, "both": MARGIN - 0.005})])
    pick = lambda b, c=2048, mlp=True, dev="GPU X": choose_variant(cfg, b, c, mlp, table=table, device=dev)  # noqa: E731
    assert pick(1) == "mlp" and pick(2) == "mlp"
    assert pick(32) == "both" and pick(64) == "both"
    assert pick(256) == "dense"  # nothing there beats dense by the margin
    assert pick(1, mlp=False) == "dense"  # heads alone is slower at B=1
    assert pick(32, mlp=False) == "heads"
    assert pick(8) == "dense"  # two doublings from anything measured
    assert pick(32, c=16384) == "dense"
    assert pick(32, dev="another GPU") == "dense"
    for b in (1, 2, 32, 64, 256):
        v = pick(b)
        e = min(table["entries"], key=lambda e: abs(np.log2(e["batch"] / b)))
        assert v == "dense" or e["speedup"][v] >= MARGIN


def test_committed_policy_table_only_picks_measured_winners():
    table = polar_jax.policy.load_table()
    assert table["entries"], "decode_policy.json holds no measurements"
    for e in table["entries"]:
        cfg = polar_jax.bench.shapes.SHAPES[e["shape"]]
        v = choose_variant(cfg, e["batch"], e["context"], cfg.relu_mlp, table=table, device=e["device"])
        assert v == "dense" or e["speedup"][v] == max(e["speedup"].values()) >= MARGIN


# ---- errors ---------------------------------------------------------------------------------------------
def test_bad_sparsity_settings_give_clear_errors(opt_default):
    model, tok, bundle = opt_default
    p = [tok.encode("The history")]
    for kw, match in ((dict(sparsity="default", policy="fast"), "policy"),
                      (dict(sparsity="default", attn_density=1.5), "density"),
                      (dict(attn_density=0.5), "need sparsity"),
                      (dict(sparsity="default", selector=router_selector(bundle, 0.5)), "either"),
                      (dict(sparsity="default", impl="cuda"), "impl")):
        with pytest.raises(InputError, match=match):
            polar_jax.generate(model, p, 4, **kw)
    llama, _ = load_cached("tiny-llama")
    with pytest.raises(PolarError, match="another model"):
        polar_jax.generate(llama, [[1, 2, 3]], 4, sparsity=bundle)
    with pytest.raises(InputError, match="built for another model"):
        polar_jax.generate(llama, [[1, 2, 3]], 4, selector=router_selector(bundle, 0.5))


def test_bench_decode_runs_tiny_and_refuses_large_shapes_on_cpu(capsys):
    from polar_jax.cli import main

    assert main(["bench", "decode", "--tiny", "--variants", "dense", "both", "auto"]) == 0
    out = capsys.readouterr().out
    assert "| tiny-opt | 4 | 32 | both (both) |" in out and "| tiny-opt | 4 | 32 | auto (dense) |" in out
    assert main(["bench", "decode", "--shapes", "opt-6.7b"]) == 2
    assert "need a GPU" in capsys.readouterr().err


def test_bench_adaptive_budgets_keep_the_fixed_mean_with_per_sequence_counts():
    """The benchmark's adaptive-head variants: thresholds calibrated on the router inputs (calibrate_heads)
    give per-row counts within [floor, cap] whose mean over those rows is the fixed budget k, and rows
    differ; the fixed selector gives every row k."""
    from polar_jax.bench.shapes import SHAPES
    from polar_jax.bench.synthetic import calibrate_heads, random_bundle
    from polar_jax.routers.config import budget_bounds

    cfg = SHAPES["tiny-opt"]
    bundle = random_bundle(cfg, 16, jnp.float32)
    x = np.random.default_rng(3).standard_normal((cfg.num_layers, 64, cfg.hidden_size)).astype(np.float32)
    adaptive = calibrate_heads(bundle, x)
    live = jnp.ones((64,), bool)
    fixed_sel = router_selector(adaptive, attn_density=0.5, mlp=False)
    adaptive_sel = router_selector(adaptive, attn_density=0.5, mlp=False, adaptive=True)
    for layer in range(1, cfg.num_layers):
        k = fixed_sel.attn_k[layer]
        floor, cap = budget_bounds(k, cfg.num_heads, 0.5, 2.0)
        assert 1 < k < cfg.num_heads
        assert np.asarray(fixed_sel.attention(layer, jnp.asarray(x[layer]), live).n_active).tolist() == [k] * 64
        n = np.asarray(adaptive_sel.attention(layer, jnp.asarray(x[layer]), live).n_active)
        assert n.min() >= floor and n.max() <= cap and n.min() < n.max()
        assert abs(n.mean() - k) <= 2 / 64  # one row's count is the bisection's resolution


def test_bench_decode_times_adaptive_head_budgets_beside_fixed_ones(capsys, tmp_path):
    """`heads-adaptive` runs the heads variant with per-sequence budgets (the probe of its step sees rows keep
    different counts), beside the fixed top-k."""
    import json

    from polar_jax.cli import main

    assert main(["bench", "decode", "--tiny", "--shapes", "tiny-opt", "--batches", "8", "--variants", "dense",
                 "heads", "heads-adaptive", "--attn-density", "0.5", "--sizes", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| tiny-opt | 8 | 32 | heads (heads) |" in out and "| tiny-opt | 8 | 32 | heads-adaptive (heads) |" in out
    (report,) = tmp_path.glob("*.json")
    counts = {r["variant"]: np.asarray(r["sizes"]["attn_n_active"]) for r in json.loads(report.read_text())["rows"]
              if r["variant"] != "dense"}
    assert counts["heads"].min() == counts["heads"].max()  # every row k
    assert counts["heads-adaptive"].min() < counts["heads-adaptive"].max()


def test_attention_selection_for_dead_rows():
    sel = AttentionSelection.all_groups(3, 4).for_live(jnp.asarray([True, False, True]))
    assert np.asarray(sel.n_active).tolist() == [4, 0, 4]


def test_selection_types_are_pytrees_that_cross_jit():
    """The decode step takes AttentionSelection / MLPSelection through jit: their arrays are the leaves and
    MLPSelection.dense is static (a Python bool the step branches on while tracing)."""
    att = AttentionSelection(jnp.asarray([[2, 0], [1, 3]], jnp.int32), jnp.asarray([2, 1], jnp.int32))
    assert len(jax.tree_util.tree_leaves(att)) == 2
    out = jax.jit(lambda s, live: s.for_live(live))(att, jnp.asarray([False, True]))
    assert isinstance(out, AttentionSelection)
    np.testing.assert_array_equal(np.asarray(out.groups), np.asarray(att.groups))
    assert np.asarray(out.n_active).tolist() == [0, 1]
    assert att.for_live(None) is att  # no live mask: every row keeps its slots
    mlp = MLPSelection.of(np.asarray([5, 1, 7]), 2)
    assert mlp.idx.dtype == jnp.int32 and mlp.n_active.dtype == jnp.int32 and not mlp.dense
    assert len(jax.tree_util.tree_leaves(mlp)) == 2
    signed = jax.jit(lambda s: s.n_active if s.dense else -s.n_active)
    assert int(signed(mlp)) == -2 and int(signed(MLPSelection(mlp.idx, mlp.n_active, dense=True))) == 2
    for sel, field in ((att, "n_active"), (mlp, "n_active"), (mlp, "dense")):  # values: one selection is
        with pytest.raises(dataclasses.FrozenInstanceError):  # shared by every layer's reads, never edited
            setattr(sel, field, 0)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_ranks_heads_with_one_unit_top_k_call_per_sparse_layer(opt_default, batch, monkeypatch):
    """The decode step ranks each sparse layer's heads through `pallas_kernels.unit_top_k` on the selector's
    backend (one kernel from the raw router product), not through XLA's ranking, at B=1 (where the product is
    shared with the MLP router) and above."""
    model, _, bundle = opt_default
    sparsify = importlib.import_module("polar_jax.routers.sparsify")
    calls = []
    real = sparsify.unit_top_k

    def counting(scores, k, bias=None, **kw):
        calls.append((scores.shape, kw.get("impl")))
        return real(scores, k, bias, **kw)

    monkeypatch.setattr(sparsify, "unit_top_k", counting)
    jax.clear_caches()  # the step must be traced here: an executable cached by an earlier test would skip the spy
    sel = router_selector(bundle, 0.5, 0.99, select_impl="triton")
    toks = _tokens(model, batch, 8, seed=3)
    graphdef, state = split_model(model)
    cache = KVCache.create(model.config, batch, 16, model.dtype)
    _, cache = prefill(graphdef, state, toks[:, :6], jnp.full((batch,), 6, jnp.int32), cache)
    decode_step(graphdef, state, cache, toks[:, 6], sel, "xla", "xla")
    sparse_layers = [i for i in range(model.config.num_layers) if sel._attn_on(i)]
    assert sparse_layers, "the default bundle should sparsify some layers' heads"
    assert [impl for _, impl in calls] == ["triton"] * len(sparse_layers)
    assert all(shape[0] == batch for shape, _ in calls)
