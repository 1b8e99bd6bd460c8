"""The decode benchmark's profile breakdown: kernels mapped to the step's parts through HLO scopes."""

from polar_jax.bench.breakdown import breakdown, hlo_scopes, kernel_stem, kernel_table, part_ms, part_of

HLO = """
  %gemm_fusion_dot.162 = f32[4,32,8192]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%c, metadata={op_name="jit(run)/while/body/polar_attn_proj/dot_general" deduplicated_name="gemm_fusion_dot.162"}
  %fusion.1167 = bf16[32,8192]{1,0} fusion(%gemm_fusion_dot.162), kind=kLoop, calls=%d, metadata={op_name="reduce_sum" scheduling_name="fusion.1167"}
  ROOT %sort.63.1 = (f32[16384]{0}, s32[16384]{0}) sort(%p, %q), dimensions={0}, metadata={op_name="jit(run)/polar_router/top_k"}
  %loop_add_fusion.64 = bf16[32,4096]{1,0} fusion(%x, %y), kind=kLoop, calls=%e, metadata={op_name="jit(run)/while/body/add"}
"""


def test_kernel_names_map_to_their_scopes():
    scopes = hlo_scopes(HLO)
    assert part_of("gemm_fusion_dot_162", scopes) == "attn_proj"
    assert part_of("sort_63_1__2", scopes) == "router"  # XLA's kernel copies get __N suffixes
    assert part_of("loop_add_fusion_64", scopes) == "other"
    assert part_of("select_decode_finish", scopes) == "attention"
    assert part_of("gather_down", scopes) == "mlp" and part_of("union_compact", scopes) == "router"
    assert part_of("unit_top_k", scopes) == "router"  # the heads' top-k is selection
    assert part_of("unknown_kernel", scopes) == "other"
    assert part_of("gemv_multi", scopes) == "attn_proj" and part_of("gemv_rows", scopes) == "attn_proj"
    # the dense GEMVs carry the part they were traced in; no label, or one that is not a part: "other"
    assert part_of("gemv_nk_mlp", scopes) == "mlp" and part_of("gemv_kn_attn_proj", scopes) == "attn_proj"
    assert part_of("gemv_kn", scopes) == "other" and part_of("gemv_kn_lm_head", scopes) == "other"
    assert part_of("kv_append", scopes) == "attention"  # the cache append, in the attention scope


def test_split_k_reduction_counts_with_its_gemm():
    scopes = hlo_scopes(HLO)
    recs = [("gemm_fusion_dot_162", 1.0), ("fusion_1167", 0.5), ("loop_add_fusion_64", 0.25), ("gather_up", 2.0)] * 2
    b = breakdown(recs, scopes, steps=2)
    assert b["attn_proj"] == 1.5 and b["other"] == 0.25 and b["mlp"] == 2.0
    assert b["total"] == 3.75 and b["kernels"] == 4


def test_kernel_table_groups_layers_by_stem():
    scopes = hlo_scopes(HLO)
    recs = [("gemm_fusion_dot_162", 1.0), ("fusion_1167", 0.5), ("loop_add_fusion_64", 0.25),
            ("loop_add_fusion_65__2", 0.75), ("gather_up", 2.0)] * 2
    rows = kernel_table(recs, scopes, steps=2)
    by = {(r["kernel"], r["part"]): r for r in rows}
    assert rows[0]["kernel"] == "gather_up" and rows[0]["ms_per_step"] == 2.0
    assert by[("loop_add_fusion", "other")]["per_step"] == 2 and by[("loop_add_fusion", "other")]["ms_per_step"] == 1.0
    assert by[("fusion", "attn_proj")]["per_step"] == 1  # the split-K reduction keeps its GEMM's part
    assert kernel_stem("sort_63_1__2") == "sort" and kernel_stem("gather_down") == "gather_down"


def test_part_ms_rereads_pallas_kernels_by_name_and_keeps_xla_kernels_stored_parts():
    """A kernel table written when `unit_top_k` was still "other" counts it as router + selection; XLA fusions
    keep the part their HLO scope gave them."""
    kernels = [{"kernel": "union_mask", "part": "router", "per_step": 31, "ms_per_step": 0.43},
               {"kernel": "unit_top_k", "part": "other", "per_step": 31, "ms_per_step": 0.05},
               {"kernel": "gemm_fusion_dot", "part": "router", "per_step": 31, "ms_per_step": 0.06},
               {"kernel": "gemm_fusion_dot", "part": "attn_proj", "per_step": 96, "ms_per_step": 1.86},
               {"kernel": "loop_add_fusion", "part": "other", "per_step": 33, "ms_per_step": 0.07}]
    assert abs(part_ms(kernels, "router") - 0.54) < 1e-12
    assert abs(part_ms(kernels, "other") - 0.07) < 1e-12
    assert abs(part_ms(kernels, "attn_proj") - 1.86) < 1e-12


def test_the_routers_f32_gemv_is_named_apart_from_the_projections():
    """The routers' first product at 17-32 rows is the Pallas GEMV in float32 (`gemv_f32`). Named gemv_nk like the
    dense projections it was counted in "other" (2026-12-08 profile: ~0.19 ms of OPT-6.7B's B=32 step), which made
    router + selection read 3.9 % of the dense step instead of ~5.1 %. With the router's label it lowers as
    gemv_nk_router (test_router_fusion checks the router passes it)."""
    import re

    import jax
    import jax.numpy as jnp

    from pallas_kernels import dense_gemv_triton as tri
    from pallas_kernels.dense_gemv import kernel_name
    from pallas_kernels.lowering import lower_for_cuda

    x = jax.ShapeDtypeStruct((32, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1056, 4096), jnp.bfloat16)  # 32 head-router columns + rank 1024
    names = {}
    for op, fn in (("f32", lambda x, w: tri.gemv_f32_triton(x, w, layout="nk", interpret=False,
                                                           cfg=tri.choose_f32_config(32, 4096, 1056, "nk"),
                                                           name=kernel_name("nk", "router"))),
                   ("dense", lambda x, w: tri.gemv_triton(x, w, None, activation=None, layout="nk", interpret=False,
                                                          cfg=tri.choose_gemv_config(32, 4096, 1056, "nk")))):
        names[op] = set(re.findall(r"gemv_nk(?:_router)?\b", lower_for_cuda(fn, x, w)))
    assert names == {"f32": {"gemv_nk_router"}, "dense": {"gemv_nk"}}
    assert part_of("gemv_nk_router", {}) == "router" and part_of("gemv_nk", {}) == "other"
