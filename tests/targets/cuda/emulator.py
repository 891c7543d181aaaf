"""Run a generated CUDA source on the CPU: g++ compiles it against a header that plays the GPU (one OS thread
per CUDA thread, blocks one after another, `__syncthreads` as a barrier, warp-collective operations as a
32-thread exchange), so a kernel's index arithmetic, tiling, bounds and shared-memory pipelining are checked
here without a GPU.

What it cannot check: timing, memory-ordering hazards a barrier would hide (cp.async copies land at once), and
the PTX semantics themselves. `mma_bf16_16816` is emulated from the PTX ISA's fragment layouts, the same
reading the kernel's code follows, so a misreading of the ISA would pass here and fail on a GPU.
"""
from __future__ import annotations

import ctypes
import hashlib
import pathlib
import subprocess

import torch

from autocomp_compile.targets.cuda.runtime import launch_spec

HEADER = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define AUTOCOMP_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
namespace emu {
struct Warp {
  std::barrier<> bar{32};
  unsigned a[32][4], b[32][2];
  float v[32];
};
inline thread_local dim3 tid, bid;
inline dim3 grid_dim, block_dim;
inline std::barrier<> *block_bar;
inline std::vector<std::unique_ptr<Warp>> warps;
inline unsigned char *dyn_smem;
inline Warp &warp() { return *warps[tid.x / 32]; }
inline int lane() { return tid.x % 32; }
struct Arg {
  void *p;
  template <class T> operator T *() const { return static_cast<T *>(p); }
};
template <class F> void launch(dim3 g, unsigned threads, size_t smem, F body) {
  grid_dim = g;
  block_dim = dim3{threads, 1, 1};
  std::vector<unsigned char> shared(smem + 16);
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        std::memset(shared.data(), 0xff, shared.size());  /* bf16 NaN: reading an unwritten slot shows */
        dyn_smem = shared.data() + (16 - reinterpret_cast<size_t>(shared.data()) % 16) % 16;
        std::barrier<> bar(threads);
        block_bar = &bar;
        warps.clear();
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t, x, y, z] { tid = dim3{t, 0, 0}; bid = dim3{x, y, z}; body(); });
        for (auto &th : pool) th.join();
      }
}
}  // namespace emu
#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float v) { return std::exp(v); }
template <class T> inline T __ldg(const T *p) { return *p; }
template <class T> inline T __ldcs(const T *p) { return *p; }
template <class T> inline T __ldcg(const T *p) { return *p; }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  emu::Warp &w = emu::warp();
  w.v[emu::lane()] = v;
  w.bar.arrive_and_wait();
  const float r = w.v[emu::lane() ^ offset];
  w.bar.arrive_and_wait();
  return r;
}
inline float bf16_at(unsigned reg, int half) { return __uint_as_float(((reg >> (16 * half)) & 0xffffu) << 16); }
/* PTX mma.m16n8k16.row.col bf16: lane 4g + t holds A rows g, g + 8 and B column g (see mma.py) */
inline void mma_bf16_16816(float *d, const unsigned *a, const unsigned *b) {
  emu::Warp &w = emu::warp();
  const int l = emu::lane(), g = l >> 2, t = l & 3;
  std::memcpy(w.a[l], a, sizeof w.a[l]);
  std::memcpy(w.b[l], b, sizeof w.b[l]);
  w.bar.arrive_and_wait();
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const float av = bf16_at(w.a[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
      const float bv = bf16_at(w.b[col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k % 2);
      sum += av * bv;
    }
    d[e] += sum;
  }
  w.bar.arrive_and_wait();
}
inline void cp_async16(void *smem, const void *gmem, bool valid) {
  if (valid) std::memcpy(smem, gmem, 16); else std::memset(smem, 0, 16);
}
inline void cp_async_commit() {}
#define CP_ASYNC_WAIT(n) ((void)0)
#define DYNAMIC_SMEM(name) unsigned char *name = emu::dyn_smem
"""


def _wrappers(spec: dict) -> str:
    out = []
    for k in spec["kernels"]:
        args = ", ".join(f"emu::Arg{{a[{i}]}}" for i in range(len(k["args"])))
        out.append(f'extern "C" void emu_{k["name"]}(void **a, unsigned gx, unsigned gy, unsigned gz, unsigned threads, '
                   f'unsigned long smem) {{ emu::launch(dim3{{gx, gy, gz}}, threads, smem, [&] {{ {k["name"]}({args}); }}); }}')
    return "\n".join(out) + "\n"


def compile_source(source: str, build_dir: pathlib.Path) -> ctypes.CDLL:
    """The source plus launch wrappers as a host shared library (cached by content)."""
    text = HEADER + source + _wrappers(launch_spec(source))
    build_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    lib = build_dir / f"emu_{digest}.so"
    if not lib.exists():
        src = build_dir / f"emu_{digest}.cpp"
        src.write_text(text)
        subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w", "-o", str(lib), str(src)],
                       check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def run(source: str, tensors: dict[str, torch.Tensor], build_dir: pathlib.Path) -> None:
    """Launch every kernel of `source` in order on CPU tensors (`tensors` by workload name; outputs are
    written in place), with the scratch buffers its launch line asks for."""
    spec = launch_spec(source)
    lib = compile_source(source, build_dir)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "u32": torch.int32}
    scratch = {name: torch.zeros(n, dtype=dtypes[dt]) for name, (n, dt) in spec.get("scratch", {}).items()}
    for k in spec["kernels"]:
        if any(not isinstance(d, int) for d in k["grid"]) or any(a.startswith("#") for a in k["args"]):
            raise NotImplementedError("the emulator runs fixed grids and tensor arguments only")
        pointers = [(scratch[a[1:]] if a.startswith("$") else tensors[a]).data_ptr() for a in k["args"]]
        argv = (ctypes.c_void_p * len(pointers))(*pointers)
        getattr(lib, f"emu_{k['name']}")(argv, *[ctypes.c_uint(v) for v in k["grid"]], ctypes.c_uint(k["block"][0]),
                                         ctypes.c_ulong(k.get("smem", 0)))
