#!/usr/bin/env bash
# The GPU measurements issue 10 is waiting for (H200), as two device calls of under 10 minutes each, from the
# repository root (the device tool's `run`; results under $OUT, at most 8 files per call):
#   bash benchmarks/decode/issue10_gpu_run.sh variants   # same-process A/B of the untimed B=1 changes
#   bash benchmarks/decode/issue10_gpu_run.sh goals      # the goal points end to end, fresh processes
#   bash benchmarks/decode/issue10_gpu_run.sh all        # both, goals first, in one call
#   bash benchmarks/decode/issue10_gpu_run.sh short      # the four goal points only (little device time)
# Then: merge the two goal files (`polar-jax bench decode --merge A B --out benchmarks/results/decode_<date>/`),
# keep the raw files under benchmarks/results/raw_<date>_h200/, and write the README block from them
# (benchmarks/readme_claims.py).
set -euo pipefail
export PYTHONPATH=.
: "${OUT:?set OUT to the folder the results go to}"
V="python benchmarks/decode/step_variants.py --steps 48 --repeats 5"
BENCH="python -m polar_jax.cli bench decode --processes 2"
case "${1:-}" in
variants)
  # add_row_norm (no_add_norm: XLA finishes each projection) and unit_top_k (head_topk_xla: XLA's ranking)
  $V --points opt-6.7b:1:2048:dense,both llama2-7b:1:4096:dense,heads --code base no_add_norm head_topk_xla \
     --out "$OUT/variants_b1.json"
  $V --points llama2-7b:16:4096:dense,heads opt-6.7b:32:2048:dense,both --code base head_topk_xla \
     --out "$OUT/variants_b16_b32.json"
  ;;
goals)
  $BENCH --shapes opt-6.7b --batches 1 8 32 --contexts 2048 --variants dense both --breakdown --out /tmp/r/opt
  $BENCH --shapes llama2-7b --batches 1 16 --contexts 4096 --variants dense heads --attn-density 0.5 --out /tmp/r/ll
  cp /tmp/r/opt/*.json "$OUT/goals_opt.json"
  cp /tmp/r/ll/*.json "$OUT/goals_llama.json"
  ;;
all)
  # both in one device call where machines are scarce (each failed start costs device time): the goal points
  # first, each file copied to $OUT as soon as it exists, so a call stopped at its time limit keeps them
  mkdir -p /tmp/r
  $BENCH --shapes opt-6.7b --batches 1 8 32 --contexts 2048 --variants dense both --breakdown --out /tmp/r/opt
  cp /tmp/r/opt/*.json "$OUT/goals_opt.json"
  $BENCH --shapes llama2-7b --batches 1 16 --contexts 4096 --variants dense heads --attn-density 0.5 --out /tmp/r/ll
  cp /tmp/r/ll/*.json "$OUT/goals_llama.json"
  $V --points opt-6.7b:1:2048:dense,both llama2-7b:1:4096:dense,heads --code base no_add_norm head_topk_xla \
     --out "$OUT/variants_b1.json"
  $V --points llama2-7b:16:4096:dense,heads opt-6.7b:32:2048:dense,both --code base head_topk_xla \
     --out "$OUT/variants_b16_b32.json"
  ;;
short)
  # only the four goal points, for a call with little device time left (a stopped call keeps what is copied)
  mkdir -p /tmp/r
  $BENCH --shapes opt-6.7b --batches 1 32 --contexts 2048 --variants dense both --breakdown --out /tmp/r/opt
  cp /tmp/r/opt/*.json "$OUT/goals_opt.json"
  $BENCH --shapes llama2-7b --batches 16 --contexts 4096 --variants dense heads --attn-density 0.5 --out /tmp/r/ll
  cp /tmp/r/ll/*.json "$OUT/goals_llama.json"
  $V --points opt-6.7b:1:2048:dense,both --code base no_add_norm head_topk_xla --out "$OUT/variants_b1.json"
  ;;
*)
  echo "usage: $0 variants|goals|all|short" >&2
  exit 2
  ;;
esac
