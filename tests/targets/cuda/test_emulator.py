"""The CPU emulator of generated CUDA itself (tests/targets/cuda/emulator.py): how it places static shared
memory, on hand-written kernels whose results say what each block saw."""
from __future__ import annotations

import shutil

import pytest
import torch

from . import emulator

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulator compiles with g++")


def _kernel(body: str, grid: int = 3, threads: int = 64) -> str:
    launch = ('{"kernels": [{"name": "k", "grid": [%d, 1, 1], "block": [%d, 1, 1], "args": ["out"]}], "scratch": {}}'
              % (grid, threads))
    return f'// autocomp-launch: {launch}\nextern "C" __global__ void k(float *out) {{\n{body}\n}}\n'


def test_each_block_starts_with_nan_static_shared_memory_of_its_own(tmp_path):
    """Every declaration form the rewrite reads (multi-word types, several declarators, pointers); block 0
    writes, later blocks only read: they must see NaN, not block 0's values."""
    src = _kernel("""
  __shared__ __align__(16) float a[4][2], b[3];
  __shared__ unsigned int count[2];
  __shared__ unsigned long long wide;
  __shared__ float *where[2], plain;
  if (blockIdx.x == 0 && threadIdx.x == 0) { a[1][1] = 1.0f; b[2] = 2.0f; count[1] = 7u; wide = 9ull; plain = 3.0f;
    where[0] = &plain; }
  __syncthreads();
  if (threadIdx.x == 0) {
    float *o = out + blockIdx.x * 6;
    o[0] = a[1][1]; o[1] = b[2]; o[2] = count[1] == 7u ? 1.0f : 0.0f; o[3] = wide == 9ull ? 1.0f : 0.0f;
    o[4] = plain; o[5] = where[0] == &plain ? 1.0f : 0.0f;
  }""")
    out = torch.zeros(3 * 6)
    emulator.run(src, {"out": out}, tmp_path)
    assert out[:6].tolist() == [1.0, 2.0, 1.0, 1.0, 3.0, 1.0]
    later = out[6:].view(2, 6)
    assert torch.isnan(later[:, [0, 1, 4]]).all() and (later[:, [2, 3, 5]] == 0).all()


def test_over_48_kb_of_static_shared_memory_is_a_fault_not_a_crash(tmp_path):
    src = _kernel("""
  __shared__ float big[13 * 1024];  /* 52 KB: ptxas refuses it */
  big[threadIdx.x * 200] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = big[0];""", grid=2, threads=64)
    with pytest.raises(emulator.EmulatedFault, match="static shared memory over 49152 bytes"):
        emulator.run(src, {"out": torch.zeros(2)}, tmp_path)
    # the fault belongs to that launch only: the next kernel, in another library, runs clean
    out = torch.zeros(2)
    emulator.run(_kernel("  if (threadIdx.x == 0) out[blockIdx.x] = 5.0f;", grid=2), {"out": out}, tmp_path)
    assert out.tolist() == [5.0, 5.0]


def test_a_declaration_it_cannot_read_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot read the shared-memory declaration"):
        emulator.host_source("  __shared__ float (*rows)[4];\n")


def test_a_barrier_not_every_thread_reaches_is_a_fault_not_a_hang(tmp_path):
    src = _kernel("""
  if (threadIdx.x < 32) __syncthreads();  /* the other warp never arrives */
  out[blockIdx.x] = 1.0f;""", grid=2, threads=64)
    with pytest.raises(emulator.EmulatedFault, match="deadlock"):
        emulator.run(src, {"out": torch.zeros(2)}, tmp_path)


def test_threads_that_only_spin_are_a_fault_not_a_hang(tmp_path):
    src = _kernel("""
  volatile float *flag = out + 1;
  while (*flag == 0.0f) __nanosleep(64);  /* nothing ever sets it */
  out[0] = 1.0f;""", grid=1, threads=32)
    with pytest.raises(emulator.EmulatedFault, match="livelock"):
        emulator.run(src, {"out": torch.zeros(2)}, tmp_path)


def test_blocks_see_each_others_writes_through_a_grid_barrier(tmp_path):
    """A cooperative launch runs its blocks at once: each block spins until every block has counted itself."""
    launch = ('{"kernels": [{"name": "k", "grid": [4, 1, 1], "block": [64, 1, 1], "args": ["out"], '
              '"cooperative": true}], "scratch": {}}')
    src = f'''// autocomp-launch: {launch}
extern "C" __global__ void k(float *out) {{
  volatile float *count = out + 4;
  if (threadIdx.x == 0) {{ atomicAdd(out + 4, 1.0f); while (*count < gridDim.x) __nanosleep(64); }}
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = *count;
}}
'''
    out = torch.zeros(5)
    emulator.run(src, {"out": out}, tmp_path)
    assert out.tolist() == [4.0, 4.0, 4.0, 4.0, 4.0]
