#!/usr/bin/env bash
# The GPU measurements of issue 10 (its goals were set on an H200), each mode one device call of under 10 minutes,
# from the repository root (the device tool's `run`; results under $OUT, at most 8 files per call):
#   bash benchmarks/decode/issue10_gpu_run.sh variants   # same-process A/B of the untimed B=1 changes
#   bash benchmarks/decode/issue10_gpu_run.sh goals      # the goal points end to end, fresh processes
#   bash benchmarks/decode/issue10_gpu_run.sh all        # both, goals first, in one call
#   bash benchmarks/decode/issue10_gpu_run.sh short      # the four goal points, then the B=1 A/B (little time)
#   bash benchmarks/decode/issue10_gpu_run.sh b32        # OPT-6.7B B=32 tilings and cuBLAS GEMMs (2.2x goal)
#   bash benchmarks/decode/issue10_gpu_run.sh goals_b32  # goals, then b32
#   bash benchmarks/decode/issue10_gpu_run.sh sweep      # the other B >= 16 points (share of the Amdahl bound)
#   bash benchmarks/decode/issue10_gpu_run.sh skinny     # the GEMV at 17-32 rows against XLA's GEMMs (A/B)
#   bash benchmarks/decode/issue10_gpu_run.sh policy     # every variant at the `auto` grid (a table for this card)
#   bash benchmarks/decode/issue10_gpu_run.sh adaptive   # adaptive head budgets against fixed ones (speed)
#   bash benchmarks/decode/issue10_gpu_run.sh router     # the MLP router's second matrix neuron-major (A/B)
#   bash benchmarks/decode/issue10_gpu_run.sh next       # router, LLaMA's GEMV at B=32, adaptive: still untimed
#   bash benchmarks/decode/issue10_gpu_run.sh resweep    # the B >= 16 points again since the GEMV at 17-32 rows
#   bash benchmarks/decode/issue10_gpu_run.sh rank       # OPT-6.7B heads + MLP with MLP routers of rank 512 and 256
#   bash benchmarks/decode/issue10_gpu_run.sh first_gemv # the routers' fused first product on the GEMV at 17-32 rows
#                                                        # (timed 2026-12-07: first_gemv and multi_k128 adopted, so now
#                                                        # the same as base; raw_2026-12-07c_h100/notes.md)
#   bash benchmarks/decode/issue10_gpu_run.sh auto       # `auto` against dense at the policy grid (>= 0.98x wanted)
#   bash benchmarks/decode/issue10_gpu_run.sh mask       # union_mask with 128 neurons per program, the routers' GEMV
#                                                        # tilings, the norms at 32 rows (A/B at OPT-6.7B B=32)
#   bash benchmarks/decode/issue10_gpu_run.sh gathers    # where the gathers lose bandwidth (gather_probe.py), then
#                                                        # gather_up with fewer x re-reads in the step (A/B)
#   bash benchmarks/decode/issue10_gpu_run.sh priority   # first when a GPU comes: the prepared changes most likely to
#                                                        # move the missed goals, alone and together, in one call
#   bash benchmarks/decode/issue10_gpu_run.sh overlap    # the MLP selection in attention's launches (A/B at B=1, 8, 32)
#                                                        # and, at B=32, the routers' first product in the Q/K/V launch
# Then: merge the goal files (`polar-jax bench decode --merge A B --out benchmarks/results/decode_<date>/`), keep
# the raw files under benchmarks/results/raw_<date>_<card>/, and write the README block from them
# (benchmarks/readme_claims.py).
set -euo pipefail
export PYTHONPATH=.
: "${OUT:?set OUT to the folder the results go to}"
V="python benchmarks/decode/step_variants.py --steps 48 --repeats 5"
BENCH="python -m polar_jax.cli bench decode --processes 2"

# Each piece writes its file to $OUT as soon as it exists, so a call stopped at its time limit keeps it.
goals_opt() {  # OPT-6.7B at the given batch sizes, dense and heads + MLP, with the profile breakdown
  $BENCH --shapes opt-6.7b --batches "$@" --contexts 2048 --variants dense both --breakdown --out /tmp/r/opt
  cp /tmp/r/opt/*.json "$OUT/goals_opt.json"
}
goals_llama() {  # LLaMA-2-7B at the given batch sizes, dense and heads 0.5
  $BENCH --shapes llama2-7b --batches "$@" --contexts 4096 --variants dense heads --attn-density 0.5 --out /tmp/r/ll
  cp /tmp/r/ll/*.json "$OUT/goals_llama.json"
}
# add_row_norm (no_add_norm: XLA finishes each projection) and unit_top_k (head_topk_xla: XLA's ranking)
variants_b1() {
  $V --points opt-6.7b:1:2048:dense,both llama2-7b:1:4096:dense,heads --code base no_add_norm head_topk_xla \
     --out "$OUT/variants_b1.json"
}
variants_b16_b32() {
  $V --points llama2-7b:16:4096:dense,heads opt-6.7b:32:2048:dense,both --code base head_topk_xla \
     --out "$OUT/variants_b16_b32.json"
}
# OPT-6.7B B=32 heads + MLP (2.2x wanted): the gather and flash-decoding tilings, then the attention
# projections' GEMMs through cuBLAS instead of XLA's Triton fusions (a fresh process: flags are per process)
variants_b32_tiles() {
  $V --points opt-6.7b:32:2048:dense,both --code base up_a16 up_k256 down_d64 down_d256 attn_t2112 attn_t528 \
     --out "$OUT/variants_b32_tiles.json"
}
flags_b32() {
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $V --points opt-6.7b:32:2048:dense,both --code base \
     --out "$OUT/flags_b32_cublas.json" || echo "cuBLAS-only run failed"
}
# The other B >= 16 points (each sparse point wanted within 90 % of its Amdahl bound); sizes that fit 80 GB
bound_sweep() {
  $BENCH --shapes opt-6.7b --batches 32 --contexts 2048 --variants dense heads mlp --out /tmp/r/s1
  cp /tmp/r/s1/*.json "$OUT/sweep_opt.json"
  $BENCH --shapes llama2-7b --batches 32 --contexts 2048 --variants dense heads --attn-density 0.3 --out /tmp/r/s2
  cp /tmp/r/s2/*.json "$OUT/sweep_llama2.json"
  $BENCH --shapes llama3.1-8b --batches 64 --contexts 4096 --variants dense heads --attn-density 0.5 --out /tmp/r/s3
  cp /tmp/r/s3/*.json "$OUT/sweep_llama3.json"
}
# the Pallas GEMV at 17-32 rows (a 32-row x tile) against the rule before (XLA's GEMMs there), and the (in, out)
# weights alone on it
variants_skinny() {
  $V --points opt-6.7b:32:2048:dense,both --code base gemv_nk16 gemv_kn32 --out "$OUT/variants_skinny.json"
}
variants_skinny_llama() {  # the same for a gated MLP (timed on OPT-6.7B only so far)
  $V --points llama2-7b:32:2048:dense,heads --code base gemv_nk16 --out "$OUT/variants_skinny_llama.json"
}
# every variant at the `auto` policy's grid on this card (sizes that fit 80 GB); then, here:
#   polar-jax bench decode --merge policy_*.json --write-policy polar_jax/decode_policy.json  (adds this card's entries)
policy_grid() {
  $BENCH --shapes opt-6.7b --batches 1 8 32 --contexts 2048 --variants dense heads mlp both --out /tmp/r/p1
  cp /tmp/r/p1/*.json "$OUT/policy_opt.json"
  $BENCH --shapes llama2-7b --batches 1 16 --contexts 4096 --variants dense heads --attn-density 0.5 --out /tmp/r/p2
  cp /tmp/r/p2/*.json "$OUT/policy_llama2.json"
  $BENCH --shapes llama3.1-8b --batches 16 64 --contexts 4096 --variants dense heads --attn-density 0.5 --out /tmp/r/p3
  cp /tmp/r/p3/*.json "$OUT/policy_llama3.json"
}
# input-adaptive head budgets against the fixed top-k at the same mean (issue 10, item 5's speed side)
adaptive_speed() {
  $BENCH --shapes llama2-7b --batches 16 --contexts 4096 --variants dense heads heads-adaptive --attn-density 0.5 \
     --sizes --out /tmp/r/a1
  cp /tmp/r/a1/*.json "$OUT/adaptive_llama2.json"
  $BENCH --shapes opt-6.7b --batches 32 --contexts 2048 --variants dense both both-adaptive --sizes --out /tmp/r/a2
  cp /tmp/r/a2/*.json "$OUT/adaptive_opt.json"
}
# the MLP router's second matrix neuron-major (union_mask's reads one contiguous run per block of neurons)
variants_router() {
  $V --points opt-6.7b:1:2048:both opt-6.7b:32:2048:both --code base router_nr --out "$OUT/variants_router.json"
}
# the MLP router's rank (the paper's 1024 reads 33.5 MB per layer: over 5 % of the dense step at B=1 by bytes
# alone); the union density stays the paper's, so this times the router's cost only (accuracy: router_rank.py)
rank_speed() {
  for r in 512 256; do
    $BENCH --shapes opt-6.7b --batches 1 8 32 --contexts 2048 --variants dense both --rank "$r" --breakdown \
       --out "/tmp/r/rank$r"
    cp "/tmp/r/rank$r"/*.json "$OUT/rank${r}_opt.json"
  done
}
# at 17-32 rows, one split-K GEMV for both routers' first products (sparsify.FUSE_AT_FIRST_GEMV_ROWS) against XLA's
# two split-K GEMMs (it pays only if XLA deduplicates the two routers' identical GEMV calls, as it does their
# identical products at B=1; a `bench decode --breakdown` with the switch on counts the launches); in the same
# run, the gather kernels with the dense GEMV's tiles (up_gemv, down_gemv) and gather_down without float32
# partials (down_direct); two combinations of them, and dense at B=32 for the same-process ratio. Last, the Q/K/V
# GEMV with 2 stages or 128-wide k-steps: at 32 rows its 192 programs fit one per SM (147 KB of shared memory),
# 1.45 waves, and it streams at 75 % (dense and sparse steps alike); these tiles fit two per SM
variants_first_gemv() {
  $V --points opt-6.7b:32:2048:dense,both opt-6.7b:24:2048:both \
     --code base first_gemv up_gemv down_gemv down_direct first_gemv+up_gemv+down_gemv first_gemv+up_gemv+down_direct \
     multi_st2 multi_k128 \
     --out "$OUT/variants_first_gemv.json"
}
# `auto` (the committed policy table's choice for this card) against dense at the grid `policy` timed
auto_check() {
  $BENCH --shapes opt-6.7b --batches 1 8 32 --contexts 2048 --variants dense auto --out /tmp/r/au1
  cp /tmp/r/au1/*.json "$OUT/auto_opt.json"
  $BENCH --shapes llama2-7b --batches 1 16 --contexts 4096 --variants dense auto --attn-density 0.5 --out /tmp/r/au2
  cp /tmp/r/au2/*.json "$OUT/auto_llama2.json"
}
# union_mask at B=32 reads the routers' float32 product once per 64-neuron program (as many bytes from L2 as the
# router matrix from HBM); 128 neurons per program halve that, and so does u cast to 16 bits first. Four tilings of
# the routers' float32 GEMV (their first product, ~6 us per layer for 8.6 MB, then ~1.4 us summing its partials).
# Heads + MLP only: these touch the routers, so the dense step is the same under every one (except row_norm32: the
# norms and residual adds at 32 rows as one kernel each, which changes the dense step too; timed here on heads + MLP
# only).
mask_variants() {
  $V --points opt-6.7b:32:2048:both --code base mask_n128 mask_n128_w8 mask_u16 mask_u16+mask_n128 f32_n16_s2 f32_s8 \
     f32_n16_s1 f32_n16_s1_st6 row_norm32 --out "$OUT/variants_mask.json"
}
# The gather probe (index order, grid, x re-reads, the same bytes through the dense GEMV; fixed cost per launch),
# then in the step gather_up with 64 or 128 neurons per program and no split (fewer re-reads of x from L2)
gathers() {
  python benchmarks/kernels/gather_probe.py --out "$OUT" || echo "gather probe failed"
  $V --points opt-6.7b:32:2048:both --code base up_a64_nosplit up_a128_nosplit --out "$OUT/variants_up.json"
}
# The MLP router's selection (union_mask + union_compact) in select_decode's two launches (select_decode_union):
# at B=1 attention reads ~9 MB over ~144 short programs while union_mask's 33.5 MB wait for it; at B=32 the mask
# blocks fill attention's last wave. Heads + MLP at the three OPT-6.7B goal batch sizes; the dense step does not
# change (no MLP selection), so the A/B is on the sparse step alone
# At B=32 also the routers' first product in the Q/K/V launch (first_in_qkv: one launch and one partial sum fewer
# per layer), alone and with the overlap.
overlap_ab() {
  $V --points opt-6.7b:32:2048:both --code base overlap overlap_mask_first first_in_qkv overlap+first_in_qkv \
     --out "$OUT/variants_overlap_b32.json"
  $V --points opt-6.7b:1:2048:both opt-6.7b:8:2048:both --code base overlap overlap_mask_first overlap_st3 \
     --out "$OUT/variants_overlap_b1_b8.json"
  python benchmarks/kernels/overlap_probe.py --out "$OUT" || echo "overlap probe failed"
}
# The prepared changes with the most launches or bytes behind them, at the missed goal (OPT-6.7B B=32 heads + MLP,
# 2.2x), alone and together, with the dense step in the same process for the ratio (~5 s to compile each step);
# then the overlap at B=1 and 8, where attention leaves the most bandwidth idle; then the shared launches' kernels
# against the ops apart (overlap_probe.py). About 7 minutes: 30 compiled steps (~5 s each to trace and compile, ~3 s
# to time) and the probe; each piece writes its file when done. The rest: `gathers` and `mask`
priority() {
  $V --points opt-6.7b:32:2048:dense,both --code base overlap first_in_qkv overlap+first_in_qkv row_norm32 \
     overlap+first_in_qkv+row_norm32 overlap_mask_first mask_n128 up_a64_nosplit \
     --out "$OUT/variants_priority_b32.json"
  $V --points opt-6.7b:1:2048:both opt-6.7b:8:2048:both --code base overlap overlap_mask_first overlap_st3 \
     first_gemv_b8 overlap+first_gemv_b8 --out "$OUT/variants_priority_b1_b8.json"
  python benchmarks/kernels/overlap_probe.py --out "$OUT" || echo "overlap probe failed"
}

mkdir -p /tmp/r
case "${1:-}" in
variants) variants_b1; variants_b16_b32 ;;
goals) goals_opt 1 8 32; goals_llama 1 16 ;;
all) goals_opt 1 8 32; goals_llama 1 16; variants_b1; variants_b16_b32 ;;  # goals first: they matter most
short) goals_opt 1 32; goals_llama 16; variants_b1 ;;  # the four goal points first
b32) variants_b32_tiles; flags_b32 ;;
goals_b32) goals_opt 1 8 32; goals_llama 1 16; variants_b32_tiles; flags_b32 ;;
sweep) bound_sweep ;;
skinny) variants_skinny ;;
policy) policy_grid ;;
adaptive) adaptive_speed ;;
router) variants_router ;;
next) variants_router; variants_skinny_llama; adaptive_speed ;;  # what the 2026-12-07 session left untimed
resweep) goals_opt 32; bound_sweep ;;  # OPT-6.7B B=32 with its profile first, then the other B >= 16 points
rank) rank_speed ;;
first_gemv) variants_first_gemv ;;
auto) auto_check ;;
mask) mask_variants ;;
gathers) gathers ;;
overlap) overlap_ab ;;
priority) priority ;;
*)
  echo "usage: $0 variants|goals|all|short|b32|goals_b32|sweep|skinny|policy|adaptive|router|next|resweep|rank|first_gemv|auto|mask|gathers|overlap|priority" >&2
  exit 2
  ;;
esac
