"""Cross-lower every kernel configuration used on the GPU to CUDA (abstract H100) on CPU (the other GPU
classes: tests/test_kernel_device_classes.py).

Catches Triton-backend errors (non power-of-two blocks, unsupported primitives) in CPU CI. The
configurations come from pallas_kernels.gpu_configs, which the GPU benchmark also uses.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import gpu_configs as gc
from pallas_kernels.lowering import H100_KIND, count_triton_calls, lower_for_cuda
from pallas_kernels.selective_attention_triton import (AttnConfig, choose_attn_config,
                                                       select_decode_triton)
from pallas_kernels.selective_gemm_triton import (DownConfig, UpConfig, choose_down_config,
                                                  choose_up_config, gather_down_triton,
                                                  gather_up_triton)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)
SDS = jax.ShapeDtypeStruct
I32 = jnp.int32


def _lower_up(M, K, N, A, gated, cfg, dtype, bias=False, device_kind=H100_KIND):
    def f(x, wg, wu, i, n, b):
        return gather_up_triton(x, wg, wu, i, n, b, activation=None if gated else "relu",
                                cfg=cfg, interpret=False)
    wu = SDS((N, K), dtype) if gated else None
    b = SDS((N,), dtype) if bias else None
    return lower_for_cuda(f, SDS((M, K), dtype), SDS((N, K), dtype), wu, SDS((A,), I32),
                          SDS((), I32), b, device_kind=device_kind)


def _lower_down(M, N, D, A, cfg, dtype, bias=False, device_kind=H100_KIND):
    def f(h, w, i, n, b):
        return gather_down_triton(h, w, i, n, b, cfg=cfg, interpret=False)
    b = SDS((D,), dtype) if bias else None
    return lower_for_cuda(f, SDS((M, A), dtype), SDS((N, D), dtype), SDS((A,), I32),
                          SDS((), I32), b, device_kind=device_kind)


# select_decode is two Triton kernels: the split flash decode and the in-place finish pass.
ATTN_CALLS = 2


def _lower_attn(B, S, Hq, Hkv, D, A, cfg, dtype, window=None, device_kind=H100_KIND):
    def f(q, k, v, l, g, n):
        return select_decode_triton(q, k, v, l, g, n, sm_scale=D**-0.5, window=window, cfg=cfg,
                                    interpret=False)
    kv = SDS((B, S, Hkv, D), dtype)
    return lower_for_cuda(f, SDS((B, Hq, D), dtype), kv, kv, SDS((B,), I32), SDS((B, A), I32),
                          SDS((B,), I32), device_kind=device_kind)


def _gemm_calls():
    """Unique (op, shape-class, config) of the sweep and of the tuning variants."""
    seen, calls = set(), []
    for model, M, dens, K, N, A, gated in gc.gemm_sweep():
        ups = [choose_up_config(M, K, A, gated)]
        downs = [choose_down_config(M, K, A)]
        if (model, M, dens) in gc.TUNE_GEMM:
            ups, downs = gc.up_variants(M, K, A, gated), gc.down_variants(M, K, A)
        for cfg in ups:
            key = ("up", gated, K, cfg)
            if key not in seen:
                seen.add(key)
                calls.append(("up", M, K, N, A, gated, cfg))
        for cfg in downs:
            key = ("down", K, cfg)
            if key not in seen:
                seen.add(key)
                calls.append(("down", M, K, N, A, gated, cfg))
    return calls


GEMM_CALLS = _gemm_calls()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
def test_gemm_configs_lower_to_triton(dtype):
    assert len(GEMM_CALLS) > 10
    for op, M, K, N, A, gated, cfg in GEMM_CALLS:
        if op == "up":
            text = _lower_up(M, K, N, A, gated, cfg, dtype)
        else:
            text = _lower_down(M, N, K, A, cfg, dtype)
        assert count_triton_calls(text) == 1, (op, M, K, N, A, cfg)


def test_attention_configs_lower_to_triton():
    for heads, B, L, Hq, Hkv, D in gc.attn_sweep():
        cfgs = [choose_attn_config(B, L, Hkv, D)]
        if any((heads, B, L) == t[:3] for t in gc.TUNE_ATTN):
            cfgs = gc.attn_variants(B, L, Hkv, D)
        for cfg in cfgs:
            text = _lower_attn(B, L, Hq, Hkv, D, Hkv, cfg, jnp.float16)
            assert count_triton_calls(text) == ATTN_CALLS, (heads, B, L, cfg)


def test_options_and_odd_shapes_lower():
    """bf16, bias, window, odd dims (real models: d=5120, head dim 96) also lower."""
    bf = jnp.bfloat16
    for M, K, N, A in ((1, 5120, 13824, 700), (64, 9216, 36864, 3000), (16, 1000, 300, 77)):
        assert count_triton_calls(_lower_up(M, K, N, A, False, choose_up_config(M, K, A), bf,
                                            bias=True)) == 1
        assert count_triton_calls(_lower_up(M, K, N, A, True,
                                            choose_up_config(M, K, A, True), bf)) == 1
        assert count_triton_calls(_lower_down(M, N, K, A, choose_down_config(M, K, A), bf,
                                              bias=True)) == 1
    for B, S, Hq, Hkv, D in ((4, 1000, 28, 4, 128), (2, 4096, 40, 40, 96), (8, 300, 32, 8, 64)):
        cfg = choose_attn_config(B, S, Hkv, D)
        assert count_triton_calls(_lower_attn(B, S, Hq, Hkv, D, Hkv, cfg, bf,
                                              window=256)) == ATTN_CALLS


def _recorded_gemm_configs():
    """Every selective-GEMM configuration the committed GPU runs recorded (tuning variants and
    the sweep's per-point configs), with a shape it ran at."""
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    files = sorted(root.glob("raw_*/tune_*.json")) + sorted(root.glob("raw_*/gemm_*.json"))
    seen = {}
    for f in files:
        d = json.loads(f.read_text())
        for r in d.get("tune", []):
            if r["op"] in ("up", "down"):
                seen.setdefault((r["op"], r["model"], tuple(sorted(r["cfg"].items()))),
                                (r["M"], r["density"]))
            else:
                seen.setdefault(("attn", r["heads"], tuple(sorted(r["cfg"].items()))),
                                (r["B"], r["L"]))
        for r in d.get("gemm", []):
            for op, key in (("up", "up_cfg"), ("down", "down_cfg")):
                seen.setdefault((op, r["model"], tuple(sorted(r[key].items()))),
                                (r["M"], r["density"]))
    return files, seen


def test_every_recorded_gpu_config_lowers():
    """What ran on the GPU in the committed results lowers on CPU too (atomic variants and
    attention split targets included)."""
    files, seen = _recorded_gemm_configs()
    assert files and len(seen) > 50, "benchmarks/results/raw_*/ tuning and sweep JSON missing"
    for (op, model, items), (M, dens) in seen.items():
        if op == "attn":
            Hq, Hkv, D = gc.ATTN_HEADS[model]
            text = _lower_attn(M, dens, Hq, Hkv, D, Hkv, AttnConfig(**dict(items)), jnp.float16)
            assert count_triton_calls(text) == ATTN_CALLS, (op, model, items)
            continue
        K, N, gated = gc.GEMM_MODELS[model]
        A = gc.active_count(dens, N)
        if op == "up":
            text = _lower_up(M, K, N, A, gated, UpConfig(**dict(items)), jnp.float16)
        else:
            text = _lower_down(M, N, K, A, DownConfig(**dict(items)), jnp.float16)
        assert count_triton_calls(text) == 1, (op, model, items)


@pytest.mark.parametrize("layout", ["rn", "nr"])
@pytest.mark.parametrize("B,R,N,cap", [(1, 1024, 16384, 2048), (32, 1024, 16384, 8192), (256, 128, 11008, 11008),
                                       (7, 96, 1000, 333)])
def test_union_select_lowers_for_cuda(B, R, N, cap, layout):
    """The fused router selection: mask kernel + compaction kernel, for paper-sized routers, with the second
    router matrix stored rank-major [R, N] or neuron-major [N, R]."""
    from pallas_kernels.union_select_triton import choose_select_config, union_select_triton

    cfg = choose_select_config(B, R, N)

    def f(u, w, live, t):
        return union_select_triton(u, w, live, t, capacity=cap, cfg=cfg, interpret=False, w_layout=layout)

    w = SDS((R, N) if layout == "rn" else (N, R), jnp.bfloat16)
    text = lower_for_cuda(f, SDS((B, R), jnp.bfloat16), w, SDS((B,), jnp.bool_), SDS((), jnp.float32))
    assert count_triton_calls(text) == 2


@pytest.mark.parametrize("B,C,offset,U,k,bias", [(1, 1056, 0, 32, 9, True), (16, 32, 0, 32, 16, True),
                                                 (64, 8, 0, 8, 4, False), (2, 300, 40, 128, 64, True),
                                                 (3, 9, 0, 9, 6, False)])
def test_unit_top_k_lowers_to_one_triton_kernel(B, C, offset, U, k, bias):
    """The heads' per-sequence top-k: one kernel from the raw router product (B=1's shared product, MHA/GQA
    unit counts, the 128-unit limit)."""
    from pallas_kernels.unit_top_k_triton import unit_top_k_triton

    def f(s, b):
        return unit_top_k_triton(s, b, k=k, offset=offset, units=U, interpret=False)

    text = lower_for_cuda(f, SDS((B, C), jnp.float32), SDS((U,), jnp.bfloat16) if bias else None)
    assert count_triton_calls(text) == 1


def test_unit_top_k_refuses_bad_inputs():
    import pallas_kernels as pk

    s = jnp.zeros((2, 40), jnp.float32)
    for kwargs, err, match in (
            (dict(scores=jnp.zeros((40,)), k=3), ValueError, "dimensions"),
            (dict(scores=jnp.zeros((2, 4), jnp.int32), k=1), TypeError, "float"),
            (dict(scores=s, k=0), ValueError, "k must be"),
            (dict(scores=s, k=41), ValueError, "k must be"),
            (dict(scores=s, k=3, offset=-1), ValueError, "offset"),
            (dict(scores=s, k=3, offset=8, units=33), ValueError, "units must be"),
            (dict(scores=s, k=3, bias=jnp.zeros((39,))), ValueError, "bias must have shape"),
            (dict(scores=jnp.zeros((1, 200)), k=3), ValueError, "at most 128 units")):
        with pytest.raises(err, match=match):
            pk.unit_top_k(**kwargs, impl="xla")


@pytest.mark.parametrize("B,A,ns_min_chunk,mask_first", [(1, 9, None, False), (8, 9, None, True), (32, 9, None, False),
                                                        (16, 16, 128, False)])
def test_select_decode_union_lowers_to_two_triton_kernels(B, A, ns_min_chunk, mask_first):
    """Attention and the MLP router's selection in shared launches at OPT-6.7B's shapes (32 heads of 128, context
    2048, the rank-1024 router's product after the 32 head-router columns, 16384 neurons): two Pallas calls
    where the ops apart are four, each fitting the H100's shared memory."""
    import dataclasses

    from pallas_kernels.attention_union_triton import choose_overlap_config, select_decode_union_triton

    H, D, S, R, N, cap = 32, 128, 2048, 1024, 16384, 8192
    cfg = choose_overlap_config(B, S, A, D, 1, R, N)
    assert cfg is not None
    cfg = dataclasses.replace(cfg, mask_first=mask_first)
    if ns_min_chunk:
        cfg = dataclasses.replace(cfg, attn=dataclasses.replace(cfg.attn, min_chunk=ns_min_chunk))

    def f(q, k, v, lengths, groups, n_active, u, w, live, t):
        return select_decode_union_triton(q, k, v, lengths, groups, n_active, u, w, live, t, sm_scale=D**-0.5,
                                          window=None, capacity=cap, u_offset=H, clamp=True, w_layout="rn", cfg=cfg,
                                          interpret=False)

    bf = jnp.bfloat16
    text = lower_for_cuda(f, SDS((B, H, D), bf), SDS((B, S, H, D), bf), SDS((B, S, H, D), bf), SDS((B,), I32),
                          SDS((B, A), I32), SDS((B,), I32), SDS((B, H + R), jnp.float32), SDS((R, N), bf),
                          SDS((B,), jnp.bool_), SDS((), jnp.float32))
    assert count_triton_calls(text) == 2


def test_select_decode_union_runs_the_ops_apart_where_the_shared_launch_does_not_fit():
    """On a device class whose shared memory cannot hold both ops' buffers there is no shared-launch config (the
    entry point then runs the ops apart: tests/test_kernels_triton.py)."""
    from pallas_kernels.attention_union_triton import OverlapConfig, choose_overlap_config, overlap_smem
    from pallas_kernels.devices import SM89, SM90
    from pallas_kernels.selective_attention_triton import choose_attn_config
    from pallas_kernels.union_select_triton import choose_select_config

    assert choose_overlap_config(32, 2048, 9, 128, 1, 1024, 16384, SM90) is not None
    both = OverlapConfig(choose_attn_config(32, 2048, 9, 256, 1, SM89), choose_select_config(32, 1024, 16384, SM89))
    assert overlap_smem(both, 1, 256) > SM89.smem_per_block
    assert choose_overlap_config(32, 2048, 9, 256, 1, 1024, 16384, SM89) is None
