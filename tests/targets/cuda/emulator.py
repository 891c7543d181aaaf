"""Run a generated CUDA source on the CPU: g++ compiles it against a header that plays the GPU (one fiber per
CUDA thread, all run by the calling OS thread; blocks one after another, `__syncthreads` as a barrier,
warp-collective operations as a 32-thread exchange), so a kernel's index arithmetic, tiling, bounds and
shared-memory pipelining are checked here without a GPU.

The runtime (fiber scheduler, barriers, warp collectives, shared-memory arenas) is C++ compiled once per process
into a shared library that each kernel library links to; the header the kernels include only declares
it (precompiled), so a kernel compiles in a fraction of a second. A fiber runs until it waits at a barrier (or
yields in `__nanosleep`), so a `__syncthreads` costs context switches within one OS thread, not the wake-ups of
one OS thread per CUDA thread. A launch in which every unfinished thread waits at a barrier that cannot complete
(a `__syncthreads` that not every thread of the block reaches), or in which threads only spin, fails
(`EmulatedFault`) instead of hanging.

Three rewrites make the source host C++: `extern __shared__` arrays point into the block's dynamic shared memory,
static `__shared__` variables into the block's own static arena (each block starts with every byte 0xff, so a
block that reads shared memory it never wrote sees NaN rather than what the previous block left there, and the
blocks of a cooperative kernel, which run at once, each have their own), and L2-prefetch `asm` statements (hints,
no effect on results) are dropped; `griddepcontrol` is already behind `__CUDA_ARCH__`. Cooperative kernels (the
persistent MLP's grid barrier) run all their blocks at once; the others run blocks one after another.

cp.async copies land only at the `cp.async.wait_group` that completes their group (NaN until then), and
cp.async / ldmatrix addresses must be 16-byte aligned (else `EmulatedFault`).

What it cannot check: timing, memory-ordering hazards (fibers switch only inside barriers, warp collectives and
`__nanosleep`, in thread order, so a missing `__syncthreads` shows only where a thread reads what a later thread
writes), and the PTX semantics themselves: `mma_bf16_16816` and `ldmatrix` are emulated from the PTX ISA's
fragment layouts, the same reading the kernels follow, so a shared misreading would pass here (these layouts
were confirmed on an H100, where the same schedules pass).
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import itertools
import pathlib
import re
import shutil
import subprocess
import tempfile

import torch

from autocomp_compile.evaluation.checks import compare
from autocomp_compile.references import InputFactory, empty_outputs, get_kind
from autocomp_compile.targets.cuda.derived import derive
from autocomp_compile.targets.cuda.runtime import launch_spec, resolve_grid
from autocomp_compile.workload import Workload

EMULATED_SMS = 2  # what an "sms*N" grid is resolved with

HEADER = r"""
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
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
/* the running fiber's thread and block index, and the launch's shape (set by the scheduler at each switch) */
extern dim3 tid, bid, grid_dim, block_dim;
void sync_block();
void yield();
void check_aligned(const void *p, size_t bytes, const char *what);
void *static_shared(size_t bytes, int id);
unsigned char *dynamic_smem();
float shfl_xor(float v, int offset);
struct Arg {
  void *p;
  template <class T> operator T *() const { return static_cast<T *>(p); }
  operator long() const { return static_cast<long>(reinterpret_cast<intptr_t>(p)); }  /* a runtime dim */
};
/* Runs `body(args)` as every thread of grid `g`; the first fault, or nullptr. */
const char *launch(dim3 g, unsigned threads, size_t smem, bool together, void (*body)(void **), void **args);
}  // namespace emu
#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
inline void __syncthreads() { emu::sync_block(); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) { return a < b ? b : a; }
/* one OS thread runs every fiber, and fibers switch only inside runtime calls: plain memory is coherent */
inline void __threadfence() {}
inline void __nanosleep(unsigned) { emu::yield(); }
template <class T> inline T atomicAdd(T *p, T v) { const T old = *p; *p = old + v; return old; }
template <class T> inline void __stcg(T *p, T v) { *p = v; }
template <class T> inline T __ldg(const T *p) { emu::check_aligned(p, sizeof(T), "__ldg"); return *p; }
template <class T> inline T __ldcs(const T *p) { emu::check_aligned(p, sizeof(T), "__ldcs"); return *p; }
template <class T> inline T __ldcg(const T *p) { emu::check_aligned(p, sizeof(T), "__ldcg"); return *p; }
inline float __shfl_xor_sync(unsigned, float v, int offset) { return emu::shfl_xor(v, offset); }
/* PTX mma.m16n8k16.row.col bf16, ldmatrix.m8n8 and cp.async, emulated in the runtime */
void mma_bf16_16816(float *d, const unsigned *a, const unsigned *b);
void ldmatrix_x4(unsigned *r, const void *row);
void ldmatrix_x2(unsigned *r, const void *row);
void cp_async16(void *smem, const void *gmem, bool valid);
void cp_async_commit();
void cp_async_wait(size_t pending);
#define CP_ASYNC_WAIT(n) cp_async_wait(n)
#define DYNAMIC_SMEM(name) unsigned char *name = emu::dynamic_smem()
"""

# The runtime behind HEADER, compiled once per process. Fibers are ucontext contexts; the scheduler
# resumes, in thread order, each fiber that is not waiting at an incomplete barrier, until all have returned.
RUNTIME = r"""
#include <cstdio>
#include <memory>
#include <mutex>
#include <ucontext.h>
#include <vector>
namespace emu {
dim3 tid, bid, grid_dim, block_dim;
namespace {
constexpr size_t STATIC_SHARED_LIMIT = 48 * 1024;  /* what a block may declare statically */
constexpr size_t STACK_BYTES = 256 * 1024;          /* per fiber; malloc maps it lazily */
constexpr unsigned long IDLE_ROUNDS = 10000;        /* scheduler rounds without progress: a livelock */
struct Barrier {
  unsigned expected, arrived = 0;
  unsigned long generation = 0;
  explicit Barrier(unsigned n) : expected(n) {}
};
struct Warp {
  Barrier bar{32};
  unsigned a[32][4], b[32][2];
  float v[32];
  const unsigned char *row[32];
};
unsigned char *aligned16(std::vector<unsigned char> &v) {
  return v.data() + (16 - reinterpret_cast<size_t>(v.data()) % 16) % 16;
}
struct Block {
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> shared, statics;  /* 0xff: NaN as float and as bf16 */
  unsigned char *smem;
  std::vector<std::pair<int, unsigned char *>> static_places;  /* declaration id -> its bytes */
  std::vector<std::vector<unsigned char>> overflow;
  size_t statics_used = 0;
  Block(unsigned threads, size_t bytes) : bar(threads), shared(bytes + 16, 0xff), statics(STATIC_SHARED_LIMIT + 16, 0xff) {
    smem = aligned16(shared);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
};
struct PendingCopy { void *dst; unsigned char data[16]; };
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack{new char[STACK_BYTES]};
  dim3 tid, bid;
  Block *blk = nullptr;
  const Barrier *waiting = nullptr;  /* until its generation passes wait_generation */
  unsigned long wait_generation = 0;
  bool done = false;
  std::vector<PendingCopy> cp_open;
  std::vector<std::vector<PendingCopy>> cp_groups;  /* committed, oldest first */
};
ucontext_t scheduler;
Fiber *current = nullptr;
void (*body_fn)(void **) = nullptr;
void **body_args = nullptr;
unsigned long progress = 0;  /* barrier arrivals and finished fibers: what a livelock lacks */
bool failed = false;
char failure[256];
std::mutex launch_lock;

void fault(const char *text) {
  if (failed) return;
  failed = true;
  std::snprintf(failure, sizeof failure, "%s", text);
}
void arrive_and_wait(Barrier &b) {
  ++progress;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  current->waiting = &b;
  current->wait_generation = b.generation;
  swapcontext(&current->ctx, &scheduler);
}
Warp &warp() { return *current->blk->warps[current->tid.x / 32]; }
int lane() { return current->tid.x % 32; }
void fiber_main() {
  body_fn(body_args);
  current->done = true;
  ++progress;
}  /* returns to the scheduler through uc_link */
void start(Fiber &f, dim3 t, dim3 b, Block *blk) {
  f.tid = t;
  f.bid = b;
  f.blk = blk;
  f.waiting = nullptr;
  f.done = false;
  f.cp_open.clear();
  f.cp_groups.clear();
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc_stack.ss_size = STACK_BYTES;
  f.ctx.uc_link = &scheduler;
  makecontext(&f.ctx, fiber_main, 0);
}
/* Run `fibers` until all return; false (with a fault) on a deadlock or a livelock. */
bool run_all(std::vector<Fiber> &fibers) {
  size_t live = fibers.size();
  unsigned long idle = 0;
  while (live) {
    const unsigned long before = progress;
    bool resumed = false;
    for (Fiber &f : fibers) {
      if (f.done || (f.waiting && f.waiting->generation == f.wait_generation)) continue;
      f.waiting = nullptr;
      current = &f;
      tid = f.tid;
      bid = f.bid;
      swapcontext(&scheduler, &f.ctx);
      resumed = true;
      if (f.done) --live;
    }
    current = nullptr;
    if (!resumed) {
      fault("deadlock: every unfinished thread waits at a barrier that not all threads of its block (or warp) reach");
      return false;
    }
    idle = progress == before ? idle + 1 : 0;
    if (idle > IDLE_ROUNDS) {
      fault("livelock: threads spin (__nanosleep) and none reaches a barrier or returns");
      return false;
    }
  }
  return true;
}
}  // namespace

void sync_block() { arrive_and_wait(current->blk->bar); }
void yield() { swapcontext(&current->ctx, &scheduler); }
/* The first misuse a GPU would fault on (a misaligned vector access): reported by the launch. */
void check_aligned(const void *p, size_t bytes, const char *what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes == 0 || failed) return;
  char text[256];
  std::snprintf(text, sizeof text, "%s %p is not %zu-byte aligned (thread %u of block %u,%u)", what, p, bytes,
                tid.x, bid.x, bid.y);
  fault(text);
}
/* The block's copy of static __shared__ declaration `id` (`bytes` long, 16-byte aligned): the first thread to
   reach the declaration places it. Past 48 KB in all the kernel would not build (ptxas): reported as a fault,
   the excess placed on the heap so that the run stays in bounds. */
void *static_shared(size_t bytes, int id) {
  Block &b = *current->blk;
  for (const auto &[i, place] : b.static_places)
    if (i == id) return place;
  const size_t offset = (b.statics_used + 15) / 16 * 16;
  unsigned char *place;
  if (offset + bytes <= STATIC_SHARED_LIMIT) {
    place = aligned16(b.statics) + offset;
    b.statics_used = offset + bytes;
  } else {
    char text[64];
    std::snprintf(text, sizeof text, "static shared memory over %zu bytes", STATIC_SHARED_LIMIT);
    fault(text);
    b.overflow.emplace_back(bytes + 16, 0xff);
    place = aligned16(b.overflow.back());
  }
  b.static_places.emplace_back(id, place);
  return place;
}
unsigned char *dynamic_smem() { return current->blk->smem; }
float shfl_xor(float v, int offset) {
  Warp &w = warp();
  w.v[lane()] = v;
  arrive_and_wait(w.bar);
  const float r = w.v[lane() ^ offset];
  arrive_and_wait(w.bar);
  return r;
}
/* Blocks one after another (a fresh block, and fresh fibers on the same stacks, for each), or (`together`, for
   kernels with a grid barrier) all at once. */
const char *launch(dim3 g, unsigned threads, size_t smem, bool together, void (*body)(void **), void **args) {
  std::lock_guard<std::mutex> hold(launch_lock);
  failed = false;
  grid_dim = g;
  block_dim = dim3{threads, 1, 1};
  body_fn = body;
  body_args = args;
  std::vector<dim3> ids;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) ids.push_back(dim3{x, y, z});
  const size_t per_group = together ? ids.size() : 1;
  std::vector<Fiber> fibers(per_group * threads);
  for (size_t first = 0; first < ids.size(); first += per_group) {
    std::vector<std::unique_ptr<Block>> blocks;
    for (size_t b = 0; b < per_group; ++b) {
      blocks.push_back(std::make_unique<Block>(threads, smem));
      for (unsigned t = 0; t < threads; ++t) start(fibers[b * threads + t], dim3{t, 0, 0}, ids[first + b], blocks[b].get());
    }
    if (!run_all(fibers)) break;
  }
  return failed ? failure : nullptr;
}
}  // namespace emu

static float bf16_at(unsigned reg, int half) { return __uint_as_float(((reg >> (16 * half)) & 0xffffu) << 16); }
/* PTX mma.m16n8k16.row.col bf16: lane 4g + t holds A rows g, g + 8 and B column g (see mma.py) */
void mma_bf16_16816(float *d, const unsigned *a, const unsigned *b) {
  emu::Warp &w = emu::warp();
  const int l = emu::lane(), g = l >> 2, t = l & 3;
  std::memcpy(w.a[l], a, sizeof w.a[l]);
  std::memcpy(w.b[l], b, sizeof w.b[l]);
  emu::arrive_and_wait(w.bar);
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
  emu::arrive_and_wait(w.bar);
}
/* PTX ldmatrix.m8n8 (.b16, no .trans): lanes 8j..8j+7 address the rows of matrix j; lane 4g + t receives
   row g, columns 2t and 2t + 1 of each matrix, one 32-bit register per matrix */
static void ldmatrix_n(unsigned *r, const void *row, int matrices) {
  emu::Warp &w = emu::warp();
  const int l = emu::lane();
  if (l < 8 * matrices) emu::check_aligned(row, 16, "ldmatrix row address");
  w.row[l] = static_cast<const unsigned char *>(row);
  emu::arrive_and_wait(w.bar);
  for (int j = 0; j < matrices; ++j) std::memcpy(&r[j], w.row[8 * j + l / 4] + 4 * (l % 4), 4);
  emu::arrive_and_wait(w.bar);
}
void ldmatrix_x4(unsigned *r, const void *row) { ldmatrix_n(r, row, 4); }
void ldmatrix_x2(unsigned *r, const void *row) { ldmatrix_n(r, row, 2); }
/* cp.async: the 16 bytes land only when a cp.async.wait_group lets their group complete; until then the
   destination holds NaN, so a kernel that reads a tile before waiting for it (or waits for too few groups)
   computes garbage here as it would on a GPU. */
void cp_async16(void *smem, const void *gmem, bool valid) {
  emu::check_aligned(smem, 16, "cp.async shared destination");
  emu::check_aligned(gmem, 16, "cp.async global source");
  emu::PendingCopy c{smem, {}};
  if (valid) std::memcpy(c.data, gmem, 16);
  std::memset(smem, 0xff, 16);
  emu::current->cp_open.push_back(c);
}
void cp_async_commit() {
  emu::Fiber &f = *emu::current;
  f.cp_groups.push_back(std::move(f.cp_open));
  f.cp_open.clear();
}
void cp_async_wait(size_t pending) {
  auto &groups = emu::current->cp_groups;
  while (groups.size() > pending) {
    for (const emu::PendingCopy &c : groups.front()) std::memcpy(c.dst, c.data, 16);
    groups.erase(groups.begin());
  }
}
"""


class EmulatedFault(RuntimeError):
    """What would fault on a GPU (a misaligned vector or cp.async/ldmatrix address)."""


def _wrappers(spec: dict) -> str:
    out = []
    for k in spec["kernels"]:
        args = ", ".join(f"emu::Arg{{a[{i}]}}" for i in range(len(k["args"])))
        out.append(f'extern "C" const char *emu_{k["name"]}(void **a, unsigned gx, unsigned gy, unsigned gz, '
                   f'unsigned threads, unsigned long smem, int together) {{ return emu::launch(dim3{{gx, gy, gz}}, '
                   f'threads, smem, together, [](void **a) {{ {k["name"]}({args}); }}, a); }}')
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
    source = _DYNAMIC_SHARED.sub(r"\1 *\2 = reinterpret_cast<\1 *>(emu::dynamic_smem());", source)
    return _PREFETCH.sub(";", _static_shared(source))


_FLAGS = ["g++", "-std=c++20", "-O1", "-pthread", "-fPIC", "-w"]


def _gxx(args: list[str], what: pathlib.Path) -> None:
    done = subprocess.run(_FLAGS + args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"g++ could not build the emulation of {what}:\n{done.stderr[-3000:]}")


_runtime_dir: pathlib.Path | None = None


def _runtime() -> tuple[pathlib.Path, pathlib.Path]:
    """HEADER as a precompiled header (parsing it is most of a kernel's compile) and RUNTIME as a shared library,
    built once per process in a directory of its own, removed at exit: (the header, the library)."""
    global _runtime_dir
    if _runtime_dir is None:
        _runtime_dir = pathlib.Path(tempfile.mkdtemp(prefix="autocomp-cuda-emulator-"))
        atexit.register(shutil.rmtree, _runtime_dir, True)
    header, lib = _runtime_dir / "emu.h", _runtime_dir / "libemu.so"
    if not lib.exists():
        header.write_text(HEADER)
        _gxx(["-x", "c++-header", str(header), "-o", str(header) + ".gch"], header)
        src = _runtime_dir / "libemu.cpp"
        src.write_text(RUNTIME)
        partial = lib.with_name(lib.name + ".partial")
        _gxx(["-shared", "-include", str(header), "-o", str(partial), str(src)], src)
        partial.replace(lib)
    return header, lib


def compile_source(source: str, build_dir: pathlib.Path) -> ctypes.CDLL:
    """The source plus launch wrappers as a host shared library (cached in `build_dir` by content and runtime),
    linked to the runtime."""
    build_dir.mkdir(parents=True, exist_ok=True)
    header, runtime = _runtime()
    text = host_source(source) + _wrappers(launch_spec(source))
    digest = hashlib.sha256((str(runtime) + text).encode()).hexdigest()[:16]
    lib = build_dir / f"emu_{digest}.so"
    if not lib.exists():
        src = build_dir / f"emu_{digest}.cpp"
        src.write_text(text)
        _gxx(["-shared", "-include", str(header), "-o", str(lib), str(src), str(runtime)], src)
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
