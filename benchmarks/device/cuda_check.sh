#!/usr/bin/env bash
# One-shot GPU verification (run on a machine with an NVIDIA GPU, from the repository root):
# environment, the CUDA runtime tests, then the per-kernel benchmark on the CUDA target.
# Results go to ${OUT:-benchmarks/results}. Usage: bash benchmarks/device/cuda_check.sh [budget]
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 AUTOCOMP_CACHE_DIR=/tmp/autocomp-cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cuda-bindings', cuda.bindings.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m autocomp_compile.cli targets | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -x tests/targets/cuda -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
python3 benchmarks/kernels.py --target cuda --budget "${1:-24}" --search-timing-ms 150 --timing-ms 1500 \
  --no-inductor --output-dir /tmp/autocomp-output --json "$OUT/kernels_cuda.json" 2>&1 | grep -v "━" | tee "$OUT/kernels_cuda.txt"
