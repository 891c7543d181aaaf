"""Run a generated CUDA source on the CPU: g++ compiles it against a header that plays the GPU (one OS thread
per CUDA thread, blocks one after another, `__syncthreads` as a barrier, warp-collective operations as a
32-thread exchange), so a kernel's index arithmetic, tiling, bounds and shared-memory pipelining are checked
here without a GPU.

Three rewrites make the source host C++: `extern __shared__` arrays point into the block's dynamic shared memory,
static `__shared__` variables into the block's own static arena (each block starts with every byte 0xff, so a
block that reads shared memory it never wrote sees NaN rather than what the previous block left there, and the
blocks of a cooperative kernel, which run at once, each have their own), and L2-prefetch `asm` statements (hints,
no effect on results) are dropped; `griddepcontrol` is already behind `__CUDA_ARCH__`. Cooperative kernels (the
persistent MLP's grid barrier) run all their blocks at once; the others run blocks one after another.

cp.async copies land only at the `cp.async.wait_group` that completes their group (NaN until then), and
cp.async / ldmatrix addresses must be 16-byte aligned (else `EmulatedFault`).

What it cannot check: timing, memory-ordering hazards that the emulated warp-collectives' own barriers hide
(each mma, ldmatrix and shuffle synchronises its warp here), and the PTX semantics themselves:
`mma_bf16_16816` and `ldmatrix` are emulated from the PTX ISA's fragment layouts, the same reading the kernels
follow, so a shared misreading would pass here (these layouts were confirmed on an H100, where the same
schedules pass).
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import pathlib
import re
import subprocess

import torch

from autocomp_compile.evaluation.checks import compare
from autocomp_compile.references import InputFactory, empty_outputs, get_kind
from autocomp_compile.targets.cuda.derived import derive
from autocomp_compile.targets.cuda.runtime import launch_spec, resolve_grid
from autocomp_compile.workload import Workload

EMULATED_SMS = 2  # what an "sms*N" grid is resolved with

HEADER = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#define AUTOCOMP_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct dim3 { unsigned x = 1, y = 1, z = 1; };
namespace emu {
struct Warp {
  std::barrier<> bar{32};
  unsigned a[32][4], b[32][2];
  float v[32];
  const unsigned char *row[32];
};
constexpr size_t STATIC_SHARED_LIMIT = 48 * 1024;  /* what a block may declare statically */
inline unsigned char *aligned16(std::vector<unsigned char> &v) {
  return v.data() + (16 - reinterpret_cast<size_t>(v.data()) % 16) % 16;
}
struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> shared, statics;  /* 0xff: NaN as float and as bf16 */
  unsigned char *smem;
  std::mutex statics_lock;
  std::vector<std::pair<int, unsigned char *>> static_places;  /* declaration id -> its bytes */
  std::vector<std::vector<unsigned char>> overflow;
  size_t statics_used = 0;
  Block(unsigned threads, size_t bytes) : bar(threads), shared(bytes + 16, 0xff), statics(STATIC_SHARED_LIMIT + 16, 0xff) {
    smem = aligned16(shared);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
};
inline thread_local dim3 tid, bid;
inline thread_local Block *blk;
inline dim3 grid_dim, block_dim;
inline Warp &warp() { return *blk->warps[tid.x / 32]; }
/* The first misuse a GPU would fault on (a misaligned vector access): reported by the launch wrapper. */
inline std::atomic<bool> failed{false};
inline char failure[256];
inline void check_aligned(const void *p, size_t bytes, const char *what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes == 0 || failed.exchange(true)) return;
  std::snprintf(failure, sizeof failure, "%s %p is not %zu-byte aligned (thread %u of block %u,%u)", what, p, bytes,
                tid.x, bid.x, bid.y);
}
/* The block's copy of static __shared__ declaration `id` (`bytes` long, 16-byte aligned; kernels only: a block
   must be running): the first thread to reach the declaration places it. Past 48 KB in all the kernel would
   not build (ptxas): reported as a fault, the excess placed on the heap so that the run stays in bounds. */
inline void *static_shared(size_t bytes, int id) {
  Block &b = *blk;
  std::lock_guard<std::mutex> hold(b.statics_lock);
  for (const auto &[i, place] : b.static_places)
    if (i == id) return place;
  const size_t offset = (b.statics_used + 15) / 16 * 16;
  unsigned char *place;
  if (offset + bytes <= STATIC_SHARED_LIMIT) {
    place = aligned16(b.statics) + offset;
    b.statics_used = offset + bytes;
  } else {
    if (!failed.exchange(true))
      std::snprintf(failure, sizeof failure, "static shared memory over %zu bytes", STATIC_SHARED_LIMIT);
    b.overflow.emplace_back(bytes + 16, 0xff);
    place = aligned16(b.overflow.back());
  }
  b.static_places.emplace_back(id, place);
  return place;
}
inline int lane() { return tid.x % 32; }
struct Arg {
  void *p;
  template <class T> operator T *() const { return static_cast<T *>(p); }
  operator long() const { return static_cast<long>(reinterpret_cast<intptr_t>(p)); }  /* a runtime dim */
};
/* Blocks one after another, or (`together`, for kernels with a grid barrier) all at once. */
template <class F> void launch(dim3 g, unsigned threads, size_t smem, bool together, F body) {
  /* inline variables are one object across every emulation library loaded in the process (GNU unique
     symbols): a fault an earlier launch reported must not be reported again for this one */
  failed = false;
  grid_dim = g;
  block_dim = dim3{threads, 1, 1};
  std::vector<dim3> ids;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) ids.push_back(dim3{x, y, z});
  auto run = [&](const std::vector<dim3> &group) {
    std::vector<std::unique_ptr<Block>> blocks;
    for (size_t b = 0; b < group.size(); ++b) blocks.push_back(std::make_unique<Block>(threads, smem));
    std::vector<std::thread> pool;
    for (size_t b = 0; b < group.size(); ++b)
      for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, b, t] { tid = dim3{t, 0, 0}; bid = group[b]; blk = blocks[b].get(); body(); });
    for (auto &th : pool) th.join();
  };
  if (together) run(ids);
  else for (const dim3 &id : ids) run({id});
}
}  // namespace emu
#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
inline void __syncthreads() { emu::blk->bar.arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) { return a < b ? b : a; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
template <class T> inline T atomicAdd(T *p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> inline void __stcg(T *p, T v) { *p = v; }
template <class T> inline T __ldg(const T *p) { emu::check_aligned(p, sizeof(T), "__ldg"); return *p; }
template <class T> inline T __ldcs(const T *p) { emu::check_aligned(p, sizeof(T), "__ldcs"); return *p; }
template <class T> inline T __ldcg(const T *p) { emu::check_aligned(p, sizeof(T), "__ldcg"); return *p; }
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
/* PTX ldmatrix.m8n8 (.b16, no .trans): lanes 8j..8j+7 address the rows of matrix j; lane 4g + t receives
   row g, columns 2t and 2t + 1 of each matrix, one 32-bit register per matrix */
inline void ldmatrix_n(unsigned *r, const void *row, int matrices) {
  emu::Warp &w = emu::warp();
  const int l = emu::lane();
  if (l < 8 * matrices) emu::check_aligned(row, 16, "ldmatrix row address");
  w.row[l] = static_cast<const unsigned char *>(row);
  w.bar.arrive_and_wait();
  for (int j = 0; j < matrices; ++j) std::memcpy(&r[j], w.row[8 * j + l / 4] + 4 * (l % 4), 4);
  w.bar.arrive_and_wait();
}
inline void ldmatrix_x4(unsigned *r, const void *row) { ldmatrix_n(r, row, 4); }
inline void ldmatrix_x2(unsigned *r, const void *row) { ldmatrix_n(r, row, 2); }
/* cp.async: the 16 bytes land only when a cp.async.wait_group lets their group complete; until then the
   destination holds NaN, so a kernel that reads a tile before waiting for it (or waits for too few groups)
   computes garbage here as it would on a GPU. */
struct PendingCopy { void *dst; unsigned char data[16]; };
inline thread_local std::vector<PendingCopy> cp_open;
inline thread_local std::vector<std::vector<PendingCopy>> cp_groups;  /* committed, oldest first */
inline void cp_async16(void *smem, const void *gmem, bool valid) {
  emu::check_aligned(smem, 16, "cp.async shared destination");
  emu::check_aligned(gmem, 16, "cp.async global source");
  PendingCopy c{smem, {}};
  if (valid) std::memcpy(c.data, gmem, 16);
  std::memset(smem, 0xff, 16);
  cp_open.push_back(c);
}
inline void cp_async_commit() { cp_groups.push_back(std::move(cp_open)); cp_open.clear(); }
inline void cp_async_wait(size_t pending) {
  while (cp_groups.size() > pending) {
    for (const PendingCopy &c : cp_groups.front()) std::memcpy(c.dst, c.data, 16);
    cp_groups.erase(cp_groups.begin());
  }
}
#define CP_ASYNC_WAIT(n) cp_async_wait(n)
#define DYNAMIC_SMEM(name) unsigned char *name = emu::blk->smem
"""


class EmulatedFault(RuntimeError):
    """What would fault on a GPU (a misaligned vector or cp.async/ldmatrix address)."""


def _wrappers(spec: dict) -> str:
    out = []
    for k in spec["kernels"]:
        args = ", ".join(f"emu::Arg{{a[{i}]}}" for i in range(len(k["args"])))
        out.append(f'extern "C" const char *emu_{k["name"]}(void **a, unsigned gx, unsigned gy, unsigned gz, '
                   f'unsigned threads, unsigned long smem, int together) {{ emu::launch(dim3{{gx, gy, gz}}, threads, '
                   f'smem, together, [&] {{ {k["name"]}({args}); }}); return emu::failed ? emu::failure : nullptr; }}')
    return "\n".join(out) + "\n"


_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\[\];")
# static declarations: `__shared__ [__align__(n)] <type> <declarator>[, <declarator>...];` on one line; the
# DYNAMIC_SMEM macro's `extern __shared__ ... name[]` (no semicolon) is left for the header's own definition
_STATIC_SHARED = re.compile(r"(?<!extern )(?<![\w])__shared__[ \t]+(?:__align__\(\d+\)[ \t]+)?([^;\n]+);")
_FIRST_DECLARATOR = re.compile(r"\s*(?P<type>[A-Za-z_][\w\s]*?)\s*(?P<ptr>\**)\s*(?P<name>[A-Za-z_]\w*)\s*"
                               r"(?P<dims>(?:\[[^\]]+\]\s*)*)")
_MORE_DECLARATOR = re.compile(r"\s*(?P<ptr>\**)\s*(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]+\]\s*)*)")
_PREFETCH = re.compile(r'asm volatile\("prefetch[^"]*"[^;]*;')


def _static_shared(source: str) -> str:
    """Each static `__shared__` declarator becomes a reference into the block's static arena (emu::static_shared)."""
    ids = itertools.count()

    def declare(match: re.Match) -> str:
        declarators, out, type_name = re.split(r",(?![^\[]*\])", match.group(1)), [], ""
        for i, declarator in enumerate(declarators):
            parsed = (_FIRST_DECLARATOR if i == 0 else _MORE_DECLARATOR).fullmatch(declarator)
            if parsed is None:
                raise ValueError(f"the CUDA emulator cannot read the shared-memory declaration {match.group(0)!r}")
            type_name = parsed.group("type") if i == 0 else type_name
            name, dims = parsed.group("name"), re.sub(r"\]\s+\[", "][", parsed.group("dims").strip())
            alias = f"emu_shared_{name}_t"
            out.append(f"using {alias} = {type_name} {parsed.group('ptr')}{dims}; {alias} &{name} = "
                       f"*reinterpret_cast<{alias} *>(emu::static_shared(sizeof({alias}), {next(ids)}));")
        return " ".join(out)

    return _STATIC_SHARED.sub(declare, source)


def host_source(source: str) -> str:
    """The generated source as host C++ for the emulation header (see the module's docstring)."""
    source = _DYNAMIC_SHARED.sub(r"\1 *\2 = reinterpret_cast<\1 *>(emu::blk->smem);", source)
    return _PREFETCH.sub(";", _static_shared(source))


_FLAGS = ["g++", "-std=c++20", "-O1", "-pthread", "-fPIC", "-w"]


def _gxx(args: list[str], what: pathlib.Path) -> None:
    done = subprocess.run(_FLAGS + args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"g++ could not build the emulation of {what}:\n{done.stderr[-3000:]}")


def _precompiled_header(build_dir: pathlib.Path) -> pathlib.Path:
    """HEADER as a precompiled header (parsing it is most of a compile), built once per build_dir."""
    header = build_dir / f"emu_{hashlib.sha256(HEADER.encode()).hexdigest()[:12]}.h"
    gch = header.with_name(header.name + ".gch")
    if not gch.exists():
        header.write_text(HEADER)
        partial = gch.with_name(gch.name + ".partial")
        _gxx(["-x", "c++-header", str(header), "-o", str(partial)], header)
        partial.replace(gch)
    return header


def compile_source(source: str, build_dir: pathlib.Path) -> ctypes.CDLL:
    """The source plus launch wrappers as a host shared library (cached by content)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    header = _precompiled_header(build_dir)
    text = host_source(source) + _wrappers(launch_spec(source))
    digest = hashlib.sha256((header.name + text).encode()).hexdigest()[:16]
    lib = build_dir / f"emu_{digest}.so"
    if not lib.exists():
        src = build_dir / f"emu_{digest}.cpp"
        src.write_text(text)
        _gxx(["-shared", "-include", str(header), "-o", str(lib), str(src)], src)
    return ctypes.CDLL(str(lib))


def run(source: str, tensors: dict[str, torch.Tensor], build_dir: pathlib.Path, dims: dict[str, int] | None = None) -> None:
    """Launch every kernel of `source` in order on CPU tensors (`tensors` by workload name; outputs are
    written in place) and runtime dims `dims`, with the scratch buffers its launch line asks for."""
    spec = launch_spec(source)
    lib = compile_source(source, build_dir)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "u32": torch.int32}
    scratch = {name: torch.zeros(n, dtype=dtypes[dt]) for name, (n, dt) in spec.get("scratch", {}).items()}
    tensors = {**tensors, **{"@" + name: derive(how, tensors[src]) for name, (how, src) in spec.get("derived", {}).items()}}
    for k in spec["kernels"]:
        grid = resolve_grid(k["grid"], sms=EMULATED_SMS)
        pointers = [int(a[1:]) if a.startswith("=") else (dims or {})[a[1:]] if a.startswith("#") else
                    (scratch[a[1:]] if a.startswith("$") else tensors[a]).data_ptr() for a in k["args"]]
        argv = (ctypes.c_void_p * len(pointers))(*pointers)
        fn = getattr(lib, f"emu_{k['name']}")
        fn.restype = ctypes.c_char_p
        failure = fn(argv, *[ctypes.c_uint(v) for v in grid], ctypes.c_uint(k["block"][0]),
                     ctypes.c_ulong(k.get("smem", 0)), ctypes.c_int(bool(k.get("cooperative"))))
        if failure:
            raise EmulatedFault(f"{k['name']}: {failure.decode()}")


def check(w: Workload, source: str, build_dir: pathlib.Path, seed: int = 0):
    """Run `source` for workload `w` on fresh random inputs and compare its output with the PyTorch reference."""
    host = InputFactory(seed).inputs(w)
    ref = get_kind(w.kind).reference(host, w.params, w.runtime_dims)
    outs = empty_outputs(w, device="cpu")
    run(source, {**host, **outs}, build_dir, dict(w.runtime_dims))
    return compare("out", outs["out"], ref["out"])
