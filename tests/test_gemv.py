"""The decode GEMV (pallas_kernels.gemv): tilings, split-K, validation, CUDA lowering, and its use by the
decode step (the Pallas path and XLA's dot give the same logits and tokens). The value contract on both
backends is in kernel_test_base (test_gemv_*)."""
from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from conftest import load_cached
from pallas_kernels import dense_gemv, dense_gemv_triton as tri
from pallas_kernels.devices import CLASSES, SM90
from pallas_kernels.lowering import count_triton_calls, lower_for_cuda

row_norm = importlib.import_module("pallas_kernels.row_norm")  # the package exports a function of that name
from polar_jax.cache import KVCache
from polar_jax.decode import decode_step, prefill, split_model
from polar_jax.models.base import gemv_backend
from tests import kernel_reference as npref

SEVEN_B = [(4096, 4096, "kn"), (4096, 16384, "nk"), (16384, 4096, "kn"), (4096, 11008, "nk"), (11008, 4096, "kn"),
           (4096, 1024, "kn"), (4096, 14336, "nk"), (14336, 4096, "kn")]


@pytest.mark.parametrize("cfg", [tri.GemvConfig(32, 64, 1, 4, 2), tri.GemvConfig(16, 32, 3, 4, 2),
                                 tri.GemvConfig(64, 128, 2, 4, 2)])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_split_k_tilings_match_reference(cfg, layout):
    rng = np.random.default_rng(11)
    M, K, N = 5, 384, 80  # 80 columns: a ragged last column block for every block_n here
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((K, N) if layout == "kn" else (N, K)) * K**-0.5, jnp.float32)
    b = jnp.asarray(rng.standard_normal(N), jnp.float32)
    if (K + cfg.block_k - 1) // cfg.block_k % cfg.split_k:
        with pytest.raises(ValueError, match="split_k"):
            tri.gemv(x, w, b, "relu", layout, config=cfg)
        return
    out = tri.gemv(x, w, b, "relu", layout, config=cfg)
    assert npref.rel_err(out, npref.gemv_ref(x, w, b, "relu", layout)) < 1e-5


def test_measured_tilings_are_chosen_on_hopper():
    """The tilings the H200 sweep found best (benchmarks/results/gemv_probe_2026-11-29.md)."""
    hopper = SM90
    pick = lambda K, N, lay: tri.choose_gemv_config(1, K, N, lay, hopper)  # noqa: E731
    assert pick(4096, 4096, "kn") == tri.GemvConfig(64, 256, 2, 4, 4)
    assert pick(16384, 4096, "kn") == tri.GemvConfig(64, 256, 2, 4, 4)
    assert pick(11008, 4096, "kn") == tri.GemvConfig(32, 256, 1, 4, 4)  # 43 k-blocks: no even split
    assert pick(4096, 16384, "nk") == tri.GemvConfig(64, 256, 1, 4, 3)
    assert pick(4096, 11008, "nk") == tri.GemvConfig(32, 256, 1, 4, 3)


@pytest.mark.parametrize("dev", CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("M", [1, 32])
def test_tilings_fit_shared_memory_and_split_evenly(dev, M):
    for K, N, lay in SEVEN_B + [(64, 256, "kn"), (48, 40, "nk")]:
        cfg = tri.choose_gemv_config(M, K, N, lay, dev)
        assert cfg.block_m >= M
        assert tri.gemv_smem(cfg) <= dev.smem_per_block
        assert -(-K // cfg.block_k) % cfg.split_k == 0


@pytest.mark.parametrize("M", [1, 16, 17, 32])
def test_the_x_tile_has_16_rows_up_to_16_and_32_above(M):
    from pallas_kernels import unit_gemv_triton as ut
    want = 16 if M <= 16 else 32
    assert tri.choose_gemv_config(M, 4096, 4096, "kn").block_m == want
    assert ut.choose_multi_config(4096, 3 * 4096, rows=M).block_m == want
    assert ut.choose_rows_config(128, 4096, 16, rows=M).block_m == want


@pytest.mark.parametrize("M", [1, 16, 17, 24, 32])
def test_the_qkv_gemv_fits_two_programs_per_sm_at_17_to_32_rows(M):
    """Its 32-row x tile with 256-wide k-steps and 3 stages (the tiles up to 16 rows) leaves one program per SM;
    at 17-32 rows 128-wide k-steps with 4 stages fit two (timed faster on the H100, see choose_multi_config)."""
    from pallas_kernels import unit_gemv_triton as ut
    from pallas_kernels.devices import SM90 as hopper

    cfg = ut.choose_multi_config(4096, 3 * 4096, hopper, rows=M)
    if M <= 16:
        assert (cfg.block_k, cfg.num_stages) == (256, 3)
    else:
        assert (cfg.block_k, cfg.num_stages) == (128, 4) and 2 * tri.gemv_smem(cfg) <= hopper.smem_per_block


@pytest.mark.parametrize("M", [1, 32])
@pytest.mark.parametrize("K,N,layout", SEVEN_B[:5])
def test_chosen_tilings_lower_to_one_triton_kernel(K, N, layout, M):
    import functools
    cfg = tri.choose_gemv_config(M, K, N, layout)
    f = functools.partial(tri.gemv_triton, activation=None, layout=layout, cfg=cfg, interpret=False)
    w = jax.ShapeDtypeStruct((K, N) if layout == "kn" else (N, K), jnp.bfloat16)
    text = lower_for_cuda(lambda x, w: f(x, w, None), jax.ShapeDtypeStruct((M, K), jnp.bfloat16), w)
    assert count_triton_calls(text) == 1


@pytest.mark.parametrize("M", [17, 32])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_32_row_tile_matches_reference(M, layout):
    """17-32 rows in one 32-row x tile (ragged at 17), with split-K partials and without."""
    rng = np.random.default_rng(M)
    K, N = 384, 80
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((K, N) if layout == "kn" else (N, K)) * K**-0.5, jnp.float32)
    b = jnp.asarray(rng.standard_normal(N), jnp.float32)
    for split in (1, 3):
        cfg = tri.GemvConfig(32, 64, split, 4, 2, block_m=32)
        out = tri.gemv(x, w, b, "relu", layout, config=cfg)
        assert npref.rel_err(out, npref.gemv_ref(x, w, b, "relu", layout)) < 1e-5
    with pytest.raises(ValueError, match="block_m"):
        tri.gemv(x, w, b, None, layout, config=tri.GemvConfig(32, 64, 1, 4, 2))  # a 16-row tile


@pytest.mark.parametrize("M", [1, 17, 32])
@pytest.mark.parametrize("N", [288, 300])
@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_gemv_f32_is_the_float32_product_not_rounded(M, N, impl):
    """The routers' first product: bf16 inputs, a float32 result equal to the exact product of those bf16
    values (a result rounded to bf16 is off by ~2**-9 relative; this asks for 1e-5). N=300: a ragged last
    column block."""
    rng = np.random.default_rng(M + N)
    K = 512
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((N, K)) * K**-0.5, jnp.bfloat16)
    out = pk.gemv_f32(x, w, layout="nk", impl=impl)
    assert out.dtype == jnp.float32 and out.shape == (M, N)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert npref.rel_err(out, want) < 1e-5


def test_gemv_f32_splits_narrow_products_over_about_one_program_per_sm():
    pick = lambda M, N: tri.choose_f32_config(M, 4096, N, "nk", SM90)  # noqa: E731
    for M, N, split in [(32, 1056, 4), (17, 544, 8), (32, 288, 16), (1, 1056, 4)]:
        cfg = pick(M, N)
        assert (cfg.block_n, cfg.block_k, cfg.split_k) == (32, 256, split)
        assert cfg.block_m == (16 if M <= 16 else 32)
        assert -(-N // cfg.block_n) * cfg.split_k <= SM90.num_sms * 9 // 8
    assert (tri.choose_f32_config(32, 256, 1056, "nk", SM90).block_k, tri.choose_f32_config(32, 256, 1056, "nk", SM90).split_k) == (128, 2)
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((3, 16)), rng.standard_normal((40, 16))  # one k-block of 16: no split, direct f32
    cfg = tri.choose_f32_config(3, 16, 40, "nk")
    assert cfg.split_k == 1
    out = tri.gemv_f32(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), "nk", cfg)
    assert out.dtype == jnp.float32 and npref.rel_err(out, x @ w.T) < 1e-6
    with pytest.raises(ValueError, match="split_k=3"):
        tri.gemv_f32(jnp.ones((2, 512), jnp.float32), jnp.ones((64, 512), jnp.float32), "nk",
                     dataclasses.replace(cfg, block_k=256, split_k=3))
    with pytest.raises(ValueError, match="1 to 32 rows"):
        pk.gemv_f32(jnp.ones((33, 8)), jnp.ones((4, 8)))


@pytest.mark.parametrize("M", [1, 32])
def test_gemv_f32_lowers_to_one_triton_kernel(M):
    cfg = tri.choose_f32_config(M, 4096, 1056, "nk")
    f = lambda x, w: tri.gemv_f32_triton(x, w, layout="nk", cfg=cfg, interpret=False)  # noqa: E731
    text = lower_for_cuda(f, jax.ShapeDtypeStruct((M, 4096), jnp.bfloat16),
                          jax.ShapeDtypeStruct((1056, 4096), jnp.bfloat16))
    assert count_triton_calls(text) == 1


def test_bad_inputs_are_refused():
    x, w = jnp.ones((2, 8)), jnp.ones((8, 4))
    with pytest.raises(ValueError, match="1 to 32 rows"):
        pk.gemv(jnp.ones((33, 8)), w)
    with pytest.raises(ValueError, match="layout"):
        pk.gemv(x, w, layout="nn")
    with pytest.raises(ValueError, match="its K is"):
        pk.gemv(x, w, layout="nk")
    with pytest.raises(ValueError, match="bias"):
        pk.gemv(x, w, bias=jnp.ones(8))
    with pytest.raises(TypeError, match="dtype"):
        pk.gemv(x, w.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="activation"):
        pk.gemv(x, w, activation="tanh")


def test_gemv_rule_and_backend_choice():
    assert pk.prefers_gemv(1, "kn") and pk.prefers_gemv(1, "nk")  # measured faster end to end at B=1
    assert not pk.prefers_gemv(4, "kn") and not pk.prefers_gemv(16, "kn")  # every projection: slower at B=4
    assert pk.prefers_gemv(16, "nk")  # MLP up/gate: faster at B=8, 16
    # 17-32 rows (a 32-row tile): every projection, faster than XLA's split-K GEMMs at B=32 (H100)
    assert all(pk.prefers_gemv(m, lay) for m in (17, 32) for lay in ("kn", "nk"))
    assert not pk.prefers_gemv(33, "kn") and not pk.prefers_gemv(33, "nk")
    assert not pk.prefers_gemv(0, "nk")
    assert gemv_backend("auto", jnp.float32) is None  # no GPU here, and float32 is not a kernel GPU dtype
    assert gemv_backend("xla", jnp.bfloat16) is None
    assert gemv_backend("triton", jnp.float32) == "triton"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_decode_with_gemv_equals_xla_dot(name, batch, monkeypatch):
    """Every projection through the GEMV and every norm through `row_norm` (the limits raised for B=3: a
    batch of several rows and a ragged 16-row tile; B=20: the committed rule, a ragged 32-row tile) against XLA."""
    if batch <= 16:
        monkeypatch.setattr(dense_gemv, "GEMV_ROWS", {"nk": ((1, 16),), "kn": ((1, 16),)})
    assert all(dense_gemv.prefers_gemv(batch, lay) for lay in ("kn", "nk"))
    monkeypatch.setattr(row_norm, "ROW_NORM_MAX_M", 16)  # the norms as one kernel per call too
    model, _ = load_cached(name)
    rng = np.random.default_rng(batch)
    toks = jnp.asarray(rng.integers(3, model.config.vocab_size, (batch, 9)), jnp.int32)
    graphdef, state = split_model(model)
    outs = {}
    for gemv in ("xla", "triton"):
        cache = KVCache.create(model.config, batch, 16, model.dtype)
        _, cache = prefill(graphdef, state, toks[:, :6], jnp.full((batch,), 6, jnp.int32), cache)
        logits = []
        for i in range(6, 9):
            lg, cache = decode_step(graphdef, state, cache, toks[:, i], None, "xla", "xla", gemv)
            logits.append(np.asarray(lg))
        outs[gemv] = np.stack(logits)
    np.testing.assert_allclose(outs["triton"], outs["xla"], atol=1e-4, rtol=0)
    assert (outs["triton"].argmax(-1) == outs["xla"].argmax(-1)).all()


def test_unit_gemvs_lower_to_one_triton_kernel_each():
    """LLaMA-2-7B's B=1 attention projections: Q/K/V (Q over 16 of 32 heads) and the output projection over
    the selected heads' rows, one Triton kernel each; at 32 rows Q/K/V with the routers' first product too."""
    from pallas_kernels import unit_gemv_triton as ut
    d, width = 4096, 128
    x = jax.ShapeDtypeStruct((1, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d, d), jnp.bfloat16)
    units, n = jax.ShapeDtypeStruct((16,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    cfg = ut.choose_multi_config(d, 3 * d)
    multi = lambda x, q, k, v, u, n: ut.gemv_multi_triton(x, (q, k, v), (None, None, None), u, n, width=width,  # noqa: E731
                                                         cfg=cfg, interpret=False)
    assert count_triton_calls(lower_for_cuda(multi, x, w, w, w, units, n)) == 1
    rows = lambda x, w, u, n: ut.gemv_rows_triton(x, w, None, u, n, width=width,  # noqa: E731
                                                 cfg=ut.choose_rows_config(width, d), interpret=False)
    assert count_triton_calls(lower_for_cuda(rows, x, w, units, n)) == 1
    # OPT-6.7B at 32 rows: Q/K/V and the routers' first product (32 head columns + rank 1024, out-major, float32)
    x32 = jax.ShapeDtypeStruct((32, d), jnp.bfloat16)
    cfg32 = ut.choose_multi_config(d, 3 * d, rows=32)
    routers = lambda x, q, k, v, a: ut.gemv_multi_triton(x, (q, k, v), (None, None, None), None, None, a,  # noqa: E731
                                                          width=None, cfg=cfg32, interpret=False)
    text = lower_for_cuda(routers, x32, w, w, w, jax.ShapeDtypeStruct((1056, d), jnp.bfloat16))
    assert count_triton_calls(text) == 1 and "gemv_multi_router" in text


def test_unit_gemvs_refuse_bad_inputs():
    x, w = jnp.ones((1, 64)), jnp.ones((64, 64))
    u = jnp.asarray([0, 1], jnp.int32)
    with pytest.raises(ValueError, match="1 to 32 rows"):
        pk.gemv_rows(jnp.ones((33, 64)), w, None, u, 1, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        pk.gemv_rows(x, w, None, u, 1, 24)
    with pytest.raises(ValueError, match="whole number of units"):
        pk.gemv_rows(x, jnp.ones((64, 8)), None, u, 1, 48)
    with pytest.raises(ValueError, match="unit ids"):
        pk.gemv_rows(x, w, None, jnp.asarray([0, 2], jnp.int32), 2, 32)
    with pytest.raises(ValueError, match="n_active"):
        pk.gemv_rows(x, w, None, u, 3, 32)
    with pytest.raises(ValueError, match="at least one weight"):
        pk.gemv_multi(x, [])
    with pytest.raises(ValueError, match="biases"):
        pk.gemv_multi(x, [w, w], [None])
    with pytest.raises(ValueError, match=r"ws\[1\]"):
        pk.gemv_multi(x, [w, jnp.ones((32, 8))])
    with pytest.raises(ValueError, match="need n_active"):
        pk.gemv_multi(x, [w], units=u, width=32)
    with pytest.raises(TypeError, match="dtype"):
        pk.gemv_multi(x, [w.astype(jnp.bfloat16)])
    with pytest.raises(ValueError, match="out-major"):
        pk.gemv_multi(x, [w], f32_nk=jnp.ones((64, 32)))
    with pytest.raises(TypeError, match="dtype"):
        pk.gemv_multi(x, [w], f32_nk=jnp.ones((8, 64), jnp.bfloat16))


@pytest.mark.parametrize("split", [2, 3])
def test_gemv_rows_slot_splits_match_reference(split):
    """The output projection over selected heads with the slots split over programs (f32 partials + epilogue),
    including a split whose range is past n_active and a ragged last range."""
    from pallas_kernels import unit_gemv_triton as ut
    rng = np.random.default_rng(split)
    units_n, width, N = 7, 32, 40
    x = jnp.asarray(rng.standard_normal((1, units_n * width)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((units_n * width, N)) / 16, jnp.float32)
    b = jnp.asarray(rng.standard_normal(N), jnp.float32)
    units = jnp.asarray(rng.permutation(units_n), jnp.int32)
    cfg = tri.GemvConfig(block_n=16, block_k=32, split_k=split, num_warps=4, num_stages=2)
    for n in (0, 2, 5, units_n):
        out = ut.gemv_rows(x, w, b, units, n, width, config=cfg)
        assert npref.rel_err(out, npref.unit_rows_ref(x, w, b, units, n, width)) < 1e-5


@pytest.mark.parametrize("D,kind,bias", [(4096, "layer", True), (4096, "rms", False), (576, "rms", False),
                                         (9216, "layer", True)])
def test_row_norm_lowers_to_one_triton_kernel(D, kind, bias):
    from pallas_kernels.row_norm_triton import row_norm_triton

    def f(x, w, *b):
        return row_norm_triton(x, w, b[0] if b else None, eps=1e-5, kind=kind, interpret=False)

    args = [jax.ShapeDtypeStruct((1, D), jnp.bfloat16), jax.ShapeDtypeStruct((D,), jnp.bfloat16)]
    if bias:
        args.append(jax.ShapeDtypeStruct((D,), jnp.bfloat16))
    assert count_triton_calls(lower_for_cuda(f, *args)) == 1


def test_row_norm_refuses_bad_inputs():
    x, w = jnp.ones((2, 8), jnp.float32), jnp.ones((8,), jnp.float32)
    for kw, err, match in ((dict(kind="batch"), ValueError, "kind"), (dict(weight=jnp.ones((9,))), ValueError, "weight"),
                           (dict(bias=jnp.ones((7,))), ValueError, "bias"), (dict(bias=w, kind="rms"), ValueError, "no bias"),
                           (dict(eps=0.0), ValueError, "eps"), (dict(x=jnp.ones((8,))), ValueError, "dimensions"),
                           (dict(x=jnp.ones((2, 8), jnp.int32)), TypeError, "float")):
        args = dict(x=x, weight=w, bias=None, eps=1e-5, kind="layer") | kw
        with pytest.raises(err, match=match):
            pk.row_norm(**args)
    assert row_norm.prefers_row_norm(1) and not row_norm.prefers_row_norm(2) and not row_norm.prefers_row_norm(0)


@pytest.mark.parametrize("D,kind,S,bias", [(4096, "layer", 2, True), (4096, "rms", 9, False), (576, "rms", 1, False)])
def test_add_row_norm_lowers_to_one_triton_kernel(D, kind, S, bias):
    """The projection's epilogue, the residual add and the norm: one kernel (S partials, or one output)."""
    from pallas_kernels.row_norm_triton import add_row_norm_triton

    def f(x, parts, w, *b):
        delta = pk.SplitSum(parts, b[0] if b else None, 1, D, jnp.dtype(jnp.bfloat16))
        return add_row_norm_triton(x, delta, w, b[1] if b else None, eps=1e-5, kind=kind, interpret=False)

    args = [jax.ShapeDtypeStruct((1, D), jnp.bfloat16), jax.ShapeDtypeStruct((S, 16, D), jnp.float32),
            jax.ShapeDtypeStruct((D,), jnp.bfloat16)]
    if bias:
        args += [jax.ShapeDtypeStruct((D,), jnp.bfloat16)] * 2
    assert count_triton_calls(lower_for_cuda(f, *args)) == 1


def test_split_sum_inputs_are_checked():
    x, w = jnp.ones((1, 8), jnp.float32), jnp.ones((8,), jnp.float32)
    with pytest.raises(TypeError, match="SplitSum"):
        pk.add_row_norm(x, x, w, None, 1e-5, "rms")
    with pytest.raises(ValueError, match="delta is"):
        pk.add_row_norm(x, pk.SplitSum.finished(jnp.ones((2, 8), jnp.float32)), w, None, 1e-5, "rms")
    with pytest.raises(ValueError, match="parts must be"):
        pk.SplitSum.of_partials(jnp.ones((2, 1, 7)), None, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="bias"):
        pk.SplitSum.of_partials(jnp.ones((2, 1, 8)), jnp.ones((7,)), 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="no activation"):
        pk.gemv(x, jnp.ones((8, 4), jnp.float32), None, "relu", "kn", split_sum=True)
    with pytest.raises(ValueError, match="named backend"):
        pk.gather_down(x, jnp.ones((5, 3), jnp.float32), jnp.arange(8, dtype=jnp.int32) % 5, 2, split_sum=True)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_b1_decode_adds_each_sublayer_output_in_the_next_norm(name, monkeypatch):
    """At B=1 through the kernels every norm but the first layer's input norm finishes the previous
    projection, the final norm after the last layer included (`add_row_norm`: 2L calls for L layers), and
    the step's logits equal XLA's."""
    model, _ = load_cached(name)
    layers_mod = importlib.import_module("polar_jax.models.layers")
    calls = []
    real = layers_mod.add_row_norm

    def counting(*a, **kw):
        calls.append(kw.get("impl"))
        return real(*a, **kw)

    monkeypatch.setattr(layers_mod, "add_row_norm", counting)
    toks = jnp.asarray(np.random.default_rng(5).integers(3, model.config.vocab_size, (1, 7)), jnp.int32)
    graphdef, state = split_model(model)
    outs = {}
    for gemv in ("xla", "triton"):
        calls.clear()
        jax.clear_caches()  # the step must be traced here: an executable cached by an earlier test would skip the spy
        cache = KVCache.create(model.config, 1, 16, model.dtype)
        _, cache = prefill(graphdef, state, toks[:, :6], jnp.full((1,), 6, jnp.int32), cache)
        lg, _ = decode_step(graphdef, state, cache, toks[:, 6], None, "xla", "xla", gemv)
        outs[gemv] = (np.asarray(lg), list(calls))
    assert outs["xla"][1] == []  # XLA's dot: no one-kernel norms, nothing deferred
    assert outs["triton"][1] == ["triton"] * (2 * model.config.num_layers)
    np.testing.assert_allclose(outs["triton"][0], outs["xla"][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("B,S,H,D", [(1, 2088, 32, 128), (16, 4104, 8, 128), (3, 100, 3, 80)])
def test_kv_append_lowers_to_one_triton_kernel(B, S, H, D):
    from pallas_kernels.kv_append_triton import kv_append_triton

    def f(kc, vc, k, v, pos, live):
        return kv_append_triton(kc, vc, k, v, pos, live, interpret=False)

    c, r = jax.ShapeDtypeStruct((B, S, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, H, D), jnp.bfloat16)
    text = lower_for_cuda(f, c, c, r, r, jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.bool_))
    assert count_triton_calls(text) == 1


def test_kv_append_refuses_bad_inputs():
    kc = jnp.zeros((2, 8, 3, 4), jnp.float32)
    k = jnp.ones((2, 3, 4), jnp.float32)
    pos = jnp.zeros((2,), jnp.int32)
    for args, err, match in (((kc, kc[:, :4], k, k, pos), ValueError, "differ"),
                             ((kc, kc, k[:1], k, pos), ValueError, "one token per cache row"),
                             ((kc, kc, k, k, pos[:1]), ValueError, "positions must have shape"),
                             ((kc, kc, k, k, pos.astype(jnp.float32)), TypeError, "integer"),
                             ((kc, kc, k[0], k, pos), ValueError, "dimensions")):
        with pytest.raises(err, match=match):
            pk.kv_append(*args)


def test_kv_append_rule_keeps_float32_caches_on_xla_on_a_gpu(monkeypatch):
    kv = importlib.import_module("pallas_kernels.kv_append")
    monkeypatch.setattr(kv, "use_interpret", lambda: False)  # as on a GPU
    assert kv.prefers_kv_append(1, jnp.bfloat16) and kv.prefers_kv_append(64, jnp.float16)
    assert not kv.prefers_kv_append(1, jnp.float32) and not kv.prefers_kv_append(0, jnp.bfloat16)
    monkeypatch.setattr(kv, "use_interpret", lambda: True)  # interpret mode runs float32 too (CPU tests)
    assert kv.prefers_kv_append(1, jnp.float32)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_the_step_names_each_gemv_after_its_part(name, monkeypatch):
    """A profile sees a Pallas kernel by its name only: the decode step's GEMVs are named after the part of the
    layer they were traced in (MLP, attention projections), and the breakdown reads the part back (before
    2026-12-08 both sat in "other")."""
    from polar_jax.bench.breakdown import part_of

    names = []
    original = tri.gemv_triton

    def recording(*args, name=None, **kw):
        names.append(name)
        return original(*args, name=name, **kw)

    monkeypatch.setattr(tri, "gemv_triton", recording)
    model, _ = load_cached(name)
    graphdef, state = split_model(model)
    toks = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    cache = KVCache.create(model.config, 1, 8, model.dtype)
    _, cache = prefill(graphdef, state, toks[:, :3], jnp.full((1,), 3, jnp.int32), cache)
    decode_step(graphdef, state, cache, toks[:, 3], None, "xla", "xla", "triton")
    # the output projection and the MLP's (the Q/K/V projections are one gemv_multi launch; the LM head is XLA's)
    assert {n: part_of(n, {}) for n in names} == {"gemv_kn_attn_proj": "attn_proj", "gemv_nk_mlp": "mlp",
                                                  "gemv_kn_mlp": "mlp"}
    with pytest.raises(ValueError, match="identifier"):
        dense_gemv.gemv(jnp.ones((1, 16)), jnp.ones((16, 16)), label="not a name")
