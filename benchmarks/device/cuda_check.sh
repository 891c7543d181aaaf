#!/usr/bin/env bash
# The GPU checks of the CUDA target in one command, from the repository root (a lent H100/H200 ran it):
#   env         GPU, driver, torch, cuda-bindings, the targets this machine offers
#   cuda_tests  every schedule variant of every kernel checked against the reference on the GPU
#   mlp_sweep   the decode MLP's four schedule families on a grid (benchmarks/device/mlp_sweep.py)
#   kernels_mlp, kernels_lm_head
#               search the decode MLP and LM head (winners go to the kernel cache), then time the best
#               kernel against eager (cuBLAS) interleaved, and report GB/s and % of the measured HBM copy bandwidth
#   mlp_breakdown
#               the decode MLP's kernels alone and together, the streaming MLP, one 100.7 MB GEMV and eager under
#               three L2 states (zeroed, read, rotating weights): benchmarks/device/mlp_breakdown.py
#   kernels_prefill
#               the same for a 512-token prefill MLP and q projection and 256-token attention, searched from the
#               tensor-core kernels (TFLOP/s)
#   warm        `autocomp-compile warm --target cuda` for the other Llama-3.2-1B decode kernels (projections, attention)
#   e2e         tokens/sec at batch 1: eager, inductor, autocomp, and both compilers under CUDA graphs
#   e2e_hf      the same for transformers' LlamaForCausalLM over a StaticCache (e2e.py --hf; needs transformers >= 5)
# Each stage has a time limit, so that a slow one cannot starve the rest; its output goes to <stage>.txt in
# $RESULTS, and after every stage all of $RESULTS is packed into $OUT/gpu_results.tar.gz (one file to bring back).
# Usage: OUT=/some/dir bash benchmarks/device/cuda_check.sh     (defaults: OUT=benchmarks/results/gpu)
# Budgets and limits: BUDGET_MLP=32 BUDGET_LM_HEAD=12 BUDGET_PREFILL=12 BUDGET_WARM=12 LIMIT_SCALE=1 (multiplies
# every limit; 1.5 works); DEADLINE_S=N: the script ends within N seconds of its start (each stage's limit is cut to what is
# left, a stage with under 20 s left is skipped), so that a caller's own time limit never kills a stage
# half-way and loses its output.
# STAGES="env kernels_mlp ..." runs a subset; CACHE_IMPORT=file.json imports a cache export first (entries are
# used only where the GPU fingerprint matches, and every kernel is checked again before it enters a model);
# MLP_SEED='{"fuse_down": true}' adds a starting schedule to the MLP search; by default (MLP_SEED=auto) that is the
# fastest correct schedule of the mlp_sweep stage, when it ran into the same $RESULTS; MLP_SEED= (empty) for none.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
RESULTS=${RESULTS:-/tmp/autocomp-gpu-results}
mkdir -p "$OUT" "$RESULTS"
DEADLINE=$(( $(date +%s) + ${DEADLINE_S:-86400} ))
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export AUTOCOMP_CACHE_DIR=${AUTOCOMP_CACHE_DIR:-/tmp/autocomp-cache} TORCHINDUCTOR_FX_GRAPH_CACHE=1
BUDGET_MLP=${BUDGET_MLP:-32} BUDGET_LM_HEAD=${BUDGET_LM_HEAD:-12} BUDGET_WARM=${BUDGET_WARM:-12} SCALE=${LIMIT_SCALE:-1}
BUDGET_PREFILL=${BUDGET_PREFILL:-12}
KOPTS="--target cuda --cache --sets 1 --search-timing-ms 100 --timing-ms 1000 --rounds 2 --no-inductor --output-dir /tmp/autocomp-output"

# All stages together have limits of ~24 minutes (LM head, prefill and e2e were measured on an H100 already).
# With 15 minutes of device time, machine start included, and 10 minutes per command, run the decode MLP first:
#   STAGES="env cuda_tests mlp_sweep kernels_mlp mlp_breakdown cache" DEADLINE_S=540   (limits 580 s, ~5 min on
#   an H100), then, if 6-7 minutes are left: STAGES="import warm e2e cache" CACHE_IMPORT=<the first call's
#   cache_cuda.json, copied into the working tree> DEADLINE_S=<seconds left - 60>. A fresh machine starts with an
#   empty kernel cache: without the import, e2e's autocomp rows would be the model without our kernels.
STAGES=${STAGES:-env import cuda_tests mlp_sweep kernels_mlp mlp_breakdown kernels_lm_head kernels_prefill warm e2e e2e_hf cache}
case $SCALE in ''|*[!0-9.]*|*.*.*) echo "LIMIT_SCALE must be a number, got '$SCALE'" >&2; exit 2 ;; esac
touch "$RESULTS/.started"  # what this call writes is newer
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit; limit=$(awk -v a="$2" -v s="$SCALE" 'BEGIN { printf "%d", a * s }'); shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( DEADLINE - $(date +%s) - 15 ))  # timeout's --kill-after and the packing
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left}s left before DEADLINE_S" | tee -a "$RESULTS/stages.txt"
    tar czf "$OUT/gpu_results.tar.gz" -C "$RESULTS" .
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name: limit ${limit}s, start $(date +%T)"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v "━" | tee "$RESULTS/$name.txt"
  echo "== $name: rc=${PIPESTATUS[0]}, end $(date +%T)" | tee -a "$RESULTS/stages.txt"
  tar czf "$OUT/gpu_results.tar.gz" -C "$RESULTS" .
}

stage env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv;
  python3 -c "import torch, cuda.bindings; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cuda-bindings\", cuda.bindings.__version__)";
  python3 -m autocomp_compile.cli targets'
[ -n "${CACHE_IMPORT:-}" ] && stage import 60 python3 -m autocomp_compile.cli cache import "$CACHE_IMPORT"
stage cuda_tests 120 python3 -m pytest -q tests/targets/cuda -p no:cacheprovider -k "not emulator"  # emulator: CPU-side
stage mlp_sweep 200 python3 benchmarks/device/mlp_sweep.py --json "$RESULTS/mlp_sweep.json"
if [ "${MLP_SEED-auto}" = auto ]; then  # only a sweep of this call seeds the search (not one left in $RESULTS)
  MLP_SEED=
  if [ "$RESULTS/mlp_sweep.json" -nt "$RESULTS/.started" ]; then
    MLP_SEED=$(timeout 60 python3 benchmarks/device/mlp_sweep.py --best-of "$RESULTS/mlp_sweep.json" 2>/dev/null) || MLP_SEED=
  fi
  if [ -n "$MLP_SEED" ]; then seed_note="$MLP_SEED (the best schedule of the mlp_sweep of this call)"; else seed_note=none; fi
  echo "== MLP search seed: $seed_note" | tee -a "$RESULTS/stages.txt"
fi
stage kernels_mlp 80 python3 benchmarks/kernels.py $KOPTS --budget "$BUDGET_MLP" --only "mlp decode" --json "$RESULTS/kernels_cuda_mlp.json" \
  ${MLP_SEED:+--seed-knobs "$MLP_SEED"}
stage mlp_breakdown 90 python3 benchmarks/device/mlp_breakdown.py --runs 40 --from-sweep "$RESULTS/mlp_sweep.json" \
  --json "$RESULTS/mlp_breakdown.json"
stage kernels_lm_head 110 python3 benchmarks/kernels.py $KOPTS --budget "$BUDGET_LM_HEAD" --only lm_head --json "$RESULTS/kernels_cuda_lm_head.json"
stage kernels_prefill 150 python3 benchmarks/kernels.py $KOPTS --budget "$BUDGET_PREFILL" \
  --only "mlp prefill,gemm prefill,attention prefill" \
  --json "$RESULTS/kernels_cuda_prefill.json" --seed-knobs '{"mma": true}'
stage warm 90 python3 -m autocomp_compile.cli warm --target cuda --model llama-3.2-1b --batch 1 --budget "$BUDGET_WARM" \
  --sets 1 --timing-ms 100 --quiet --output-dir /tmp/autocomp-output --json "$RESULTS/warm_cuda.json"
stage e2e 230 python3 benchmarks/e2e.py --device cuda --batch 1 --cudagraphs --eager-prefill --prompt-len 32 \
  --decode-tokens 64 --rounds 3 --json "$RESULTS/e2e_cuda_llama-3.2-1b.json"
stage e2e_hf 230 python3 benchmarks/e2e.py --device cuda --batch 1 --hf --cudagraphs --eager-prefill --prompt-len 32 \
  --decode-tokens 64 --rounds 3 --json "$RESULTS/e2e_cuda_llama-3.2-1b_hf.json"
stage cache 30 bash -c 'python3 -m autocomp_compile.cli cache ls --target cuda &&
  python3 -m autocomp_compile.cli cache export "'"$RESULTS"'/cache_cuda.json" --target cuda'
