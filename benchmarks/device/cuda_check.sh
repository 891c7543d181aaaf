#!/usr/bin/env bash
# One-shot GPU-machine verification, from the repository root:
#   1. environment; 2. the CPU target's tests (on a host with AVX-512 / AVX512-BF16 they run those
#   kernels for real); 3. the CUDA target's tests (every schedule variant checked on the GPU);
#   4. the per-kernel benchmark on the CUDA target.
# Results go to ${OUT:-benchmarks/results}.
# Usage: bash benchmarks/device/cuda_check.sh [budget] [workloads, e.g. "lm_head,mlp,attention decode"]
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 AUTOCOMP_CACHE_DIR=/tmp/autocomp-cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cuda-bindings', cuda.bindings.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m autocomp_compile.cli targets | tee -a "$OUT/gpu.txt"
python3 -m pytest -q tests/targets/cpu -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/cpu_tests.txt"
python3 -m pytest -q tests/targets/cuda -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/cuda_tests.txt"
python3 benchmarks/kernels.py --target cuda --budget "${1:-24}" --only "${2:-lm_head,mlp,attention}" --search-timing-ms 150 \
  --timing-ms 1500 --no-inductor --output-dir /tmp/autocomp-output --json "$OUT/kernels_cuda.json" 2>&1 \
  | grep -v "━" | tee "$OUT/kernels_cuda.txt"
