"""CUDA C++ code generation from a parameterised schedule.

A generated source starts with one line, `// autocomp-launch: {json}`, that tells the runtime which
`extern "C" __global__` kernels to launch, in order, with which grid, block, dynamic shared memory
and arguments: a workload tensor by name, `$name` for a scratch buffer the runtime allocates once
(listed under "scratch"), `#name` for a runtime dim passed as a 64-bit integer. A grid size "sms*N" means
N blocks per SM of the GPU it runs on; "align" is the byte alignment the kernels' vector loads need of
every workload tensor; "order_dependent": true marks kernels that add floats with atomics, whose sums (and
so whose last bits) depend on the order blocks finish in: they are not used where PyTorch's deterministic
algorithms are asked for.

bf16 is handled as raw 16-bit patterns (widening is a shift; narrowing rounds to nearest even), so
sources need no CUDA headers and compile with NVRTC in well under a second.
"""
from __future__ import annotations

import json
import math
from typing import Any

from autocomp_compile.targets.cuda import mma
from autocomp_compile.workload import Workload

CODEGEN_VERSION = "cuda-7"  # cuda-6: cuda-5 plus "order_dependent" on the launch lines of the atomic MLP forms;
# cuda-7: the streaming MLP stages x in shared memory in lane-contiguous float4 order (no bank conflicts)
GEMV_KINDS = ("gemm", "lm_head", "mlp")

NAIVE_KNOBS: dict[str, dict[str, Any]] = {
    "gemv": dict(naive=True, warps=4, rows=1, ksplit=1, unroll=1, vec=False, x_smem=False, fuse=False,
                 stream_loads=False, l2_prefetch=False, fuse_down=False, chunk=64, persistent=False, per_sm=2,
                 down_warps=0, down_rows=0, down_ksplit=0, down_unroll=0, pdl=False,
                 mma=False, tile_m=64, tile_n=64, stages=2, ldmatrix=False, down_t=False),
    "attention": dict(naive=True, warps=4, splits=1, gqa_share=False, q_block=1, mma=False),
    "rmsnorm": dict(naive=True, threads=256, vec=False),
}
KNOB_CHOICES: dict[str, dict[str, tuple]] = {
    "gemv": dict(warps=(1, 2, 4, 8, 16), rows=(1, 2, 4, 8), ksplit=(1, 2, 4, 8), unroll=(1, 2, 4, 8),
                 chunk=(16, 32, 64, 128), per_sm=(1, 2, 3, 4),
                 down_warps=(0, 1, 2, 4, 8, 16), down_rows=(0, 1, 2, 4, 8), down_ksplit=(0, 1, 2, 4, 8),
                 down_unroll=(0, 1, 2, 4, 8), tile_m=(16, 32, 64, 128), tile_n=(16, 32, 64, 128),
                 stages=(1, 2, 3, 4)),
    "attention": dict(warps=(1, 2, 4, 8, 16), splits=(1, 2, 4, 8, 16, 32, 64), q_block=(1, 2, 4)),
    "rmsnorm": dict(threads=(64, 128, 256, 512, 1024)),
}


def family(kind: str) -> str:
    return "gemv" if kind in GEMV_KINDS else kind


def naive_knobs(w: Workload) -> dict[str, Any]:
    return dict(NAIVE_KNOBS[family(w.kind)])


def _elem_bytes(w: Workload) -> int:
    return 2 if w.dtype == "bf16" else 4


def _gemv_shape(w: Workload) -> tuple[int, int, int]:
    p = w.params
    if w.kind == "gemm":
        return p["m"], p["n"], p["k"]
    if w.kind == "lm_head":
        return p["batch"], p["vocab"], p["hidden"]
    return p["batch"], p["intermediate"], p["hidden"]  # mlp: the gate/up phase; down is (batch, hidden, inter)


STAGE_KNOBS = ("warps", "rows", "ksplit", "unroll")  # the two-kernel MLP's down stage may have its own (down_*)


def _legal_split(k: dict[str, Any], m: int, ks: list[int], nw: int, step: int) -> None:
    """Clamp one GEMV stage's warps/rows/ksplit/unroll in `k` for `m` activation rows, reduction lengths `ks`
    (every one must split evenly) and `nw` weights read together."""
    k["ksplit"] = min(k["ksplit"], k["warps"])
    while k["warps"] % k["ksplit"]:
        k["ksplit"] //= 2
    while k["ksplit"] > 1 and any(kk % (k["ksplit"] * step) for kk in ks):
        k["ksplit"] //= 2
    while k["rows"] > 1 and m * k["rows"] * nw > 32:
        k["rows"] //= 2  # accumulators live in registers
    while k["unroll"] > 1 and k["unroll"] * k["rows"] * nw > 32:
        k["unroll"] //= 2  # loads in flight live in registers too
    if k["ksplit"] > 1 and k["warps"] * nw * m * k["rows"] * 4 > 48 * 1024:
        k["ksplit"] = 1


def down_stage(k: dict[str, Any]) -> dict[str, Any]:
    """The down projection's schedule: its own `down_*` knobs, or the gate/up stage's where they are 0."""
    return {**k, **{n: k[f"down_{n}"] or k[n] for n in STAGE_KNOBS}}


def legalize(w: Workload, knobs: dict[str, Any]) -> dict[str, Any]:
    """Fill missing knobs from the naive schedule and clamp them to what the shape allows."""
    fam = family(w.kind)
    out = {**NAIVE_KNOBS[fam], **{k: v for k, v in knobs.items() if k in NAIVE_KNOBS[fam]}}
    for name, choices in KNOB_CHOICES[fam].items():
        out[name] = min(choices, key=lambda c: abs(c - float(out[name])))  # snap to a choice (and to int)
    out["naive"] = bool(out["naive"])
    if fam == "gemv":
        tensor_cores = _mma_legal(w, out)
        if tensor_cores is not None:
            return tensor_cores
        transposed = _down_t_legal(w, out)
        if transposed is not None:
            return transposed
        epv = 16 // _elem_bytes(w)
        ks = [_gemv_shape(w)[2]] + ([w.params["intermediate"]] if w.kind == "mlp" else [])
        if out["vec"] and any(k % epv for k in ks):
            out["vec"] = False
        step = epv if out["vec"] else 1
        m = _gemv_shape(w)[0]
        # the gate/up stage's knobs must also suit the down stage, which inherits them by default
        _legal_split(out, m, ks, 2 if w.kind == "mlp" else 1, step)
        out["persistent"] = _persistent_mlp_legal(w, out)
        out["fuse"] = (bool(out["fuse"]) or out["persistent"]) and w.kind == "mlp"
        out["stream_loads"] = bool(out["stream_loads"])
        out["l2_prefetch"] = bool(out["l2_prefetch"]) and out["fuse"]
        if out["x_smem"] and m * max(ks) * 4 > 48 * 1024:
            out["x_smem"] = False  # the activation must fit in shared memory as float
        out["fuse_down"] = _fused_mlp_legal(w, out) and not out["persistent"]
        if out["fuse_down"]:
            out["fuse"], out["l2_prefetch"] = True, False
            while w.params["intermediate"] % out["chunk"]:
                out["chunk"] //= 2
        two_kernel = w.kind == "mlp" and not (out["naive"] or out["fuse_down"] or out["persistent"])
        if two_kernel and any(out[f"down_{n}"] for n in STAGE_KNOBS):
            down = down_stage(out)  # once one is set, all four are explicit and legal for (hidden, intermediate)
            _legal_split(down, m, [w.params["intermediate"]], 1, step)
            out.update({f"down_{n}": down[n] for n in STAGE_KNOBS})
        else:
            out.update({f"down_{n}": 0 for n in STAGE_KNOBS})
        out["pdl"] = bool(out["pdl"]) and two_kernel and out["fuse"]
    if fam == "attention":
        out["gqa_share"] = bool(out["gqa_share"])
        prefill = w.params["phase"] == "prefill"
        out["mma"] = (bool(out["mma"]) and not out["naive"] and prefill and w.dtype == "bf16"
                      and mma.attention_legal(w.params["head_dim"], w.params["seq_len"], out))
        if out["mma"]:  # tensor cores: only the warps (16 query rows each) matter
            return {**NAIVE_KNOBS["attention"], "naive": False, "mma": True, "warps": out["warps"]}
        if w.params["phase"] == "decode":
            out["q_block"] = 1
        else:
            out["splits"] = 1
    if fam == "rmsnorm":
        out["vec"] = bool(out["vec"]) and w.params["hidden"] % (16 // _elem_bytes(w)) == 0
    return out


def _mma_legal(w: Workload, k: dict[str, Any]) -> dict[str, Any] | None:
    """The tensor-core schedule `k` stands for (only its tile knobs and warps matter), or None when `k` does not
    ask for tensor cores or the workload cannot have them (they take bf16; widths multiples of 16, K of 32)."""
    tile_knobs = ("tile_m", "tile_n", "stages", "ldmatrix")
    if k["mma"] and not k["naive"] and w.dtype == "bf16":
        m, n, kk = _gemv_shape(w)
        ns, ks = ([n, w.params["hidden"]], [kk, n]) if w.kind == "mlp" else ([n], [kk])
        tiled = dict(k)
        tiled["ldmatrix"] = bool(tiled["ldmatrix"])
        if mma.legalize(tiled, m, ns, ks, 2 if w.kind == "mlp" else 1):
            return {**NAIVE_KNOBS["gemv"], "naive": False, "mma": True, "warps": tiled["warps"],
                    **{name: tiled[name] for name in tile_knobs}}
    k["mma"] = False
    k.update({name: NAIVE_KNOBS["gemv"][name] for name in tile_knobs})
    return None


def slots_for(warps: int) -> int:
    """Shared-memory slots the streaming MLP's block reduction needs: half the warps store, the others add."""
    return (warps + 1) // 2


def _down_t_smem(w: Workload, warps: int) -> int:
    """Static shared memory of the streaming MLP: the float activation and the reduction slots (padded rows)."""
    m, h = w.params["batch"], w.params["hidden"]
    epv = 16 // _elem_bytes(w)
    padded = -(-h // (32 * epv)) * 32 * epv
    return (1 + slots_for(warps)) * m * padded * 4


def down_t_fits(w: Workload) -> bool:
    """Whether the streaming MLP (`down_t`) can run workload `w`: see _down_t_legal."""
    if w.kind != "mlp":
        return False
    m, h, i = w.params["batch"], w.params["hidden"], w.params["intermediate"]
    epv = 16 // _elem_bytes(w)
    loads = -(-h // (32 * epv))  # 16-byte loads per lane per weight row
    return h % epv == 0 and 3 * loads <= 24 and m * loads * epv <= 64 and _down_t_smem(w, 1) <= 48 * 1024 and i % 16 == 0


def _down_t_legal(w: Workload, k: dict[str, Any]) -> dict[str, Any] | None:
    """The streaming MLP's schedule (only warps, chunk and stream_loads matter), or None when `k` does not ask
    for it or the shape does not allow it: every lane holds its 16-byte loads of one row of each of the three
    weights (at most 24) and its share of the block's partial output (at most 64 floats) in registers, and the
    float activation and the reduction slots fit in static shared memory (fewer warps, fewer slots)."""
    if not (k["down_t"] and not k["naive"] and down_t_fits(w)):
        k["down_t"] = False
        return None
    i = w.params["intermediate"]
    chunk, warps = k["chunk"], k["warps"]
    while i % chunk:
        chunk //= 2
    warps = min(warps, 8)  # the loads and partial output take ~185 registers per thread: 256 threads at most
    while warps > chunk or chunk % warps or _down_t_smem(w, warps) > 48 * 1024:
        warps //= 2
    return {**NAIVE_KNOBS["gemv"], "naive": False, "vec": True, "down_t": True, "warps": warps, "chunk": chunk,
            "stream_loads": bool(k["stream_loads"])}


def _fused_mlp_legal(w: Workload, k: dict[str, Any]) -> bool:
    """The one-kernel MLP needs 16-byte loads, a chunk of the intermediate dimension that divides it,
    and the float activation plus a chunk of the SiLU output in static shared memory."""
    if not k["fuse_down"] or k["naive"] or w.kind != "mlp" or not k["vec"]:
        return False
    m, h, i = w.params["batch"], w.params["hidden"], w.params["intermediate"]
    epv = 16 // _elem_bytes(w)
    return m <= 4 and m * h <= 8192 and i % 16 == 0 and h % epv == 0


def _persistent_mlp_legal(w: Workload, k: dict[str, Any]) -> bool:
    """The persistent MLP needs 16-byte loads and the float activation and SiLU output of every row in
    (dynamic) shared memory: at most 160 KB, which an A100 block (163 KB) and a Hopper block (227 KB) can
    have; GPUs with less refuse the kernel when it is loaded."""
    if not k["persistent"] or k["naive"] or w.kind != "mlp" or not k["vec"]:
        return False
    m, h, i = w.params["batch"], w.params["hidden"], w.params["intermediate"]
    epv = 16 // _elem_bytes(w)
    return m <= 4 and (m * h + m * i) * 4 <= 160 * 1024 and i % 16 == 0 and h % epv == 0


ORDER_DEPENDENT_KNOBS = ("fuse_down", "down_t")  # the MLP forms that sum block partials with float atomics


def order_dependent(knobs: dict[str, Any]) -> bool:
    """Whether legal schedule `knobs` adds floats with atomics (results not bit-reproducible run to run)."""
    return any(knobs.get(name) for name in ORDER_DEPENDENT_KNOBS)


def generate(w: Workload, knobs: dict[str, Any]) -> str:
    """CUDA source (with its launch line) for workload `w` under legal schedule `knobs`."""
    fam = family(w.kind)
    launches, scratch, body = {"gemv": _gemv, "attention": _attention, "rmsnorm": _rmsnorm}[fam](w, knobs)
    spec = {"kernels": launches, "scratch": scratch}
    if knobs.get("down_t"):
        spec["derived"] = {"w_down_t": ["transpose", "w_down"]}  # made once per weight by the runtime
    if order_dependent(knobs):
        spec["order_dependent"] = True
    if (knobs.get("vec") or knobs.get("mma")) and not knobs.get("naive"):
        spec["align"] = 16  # 16-byte vector loads of the workload's tensors: the runtime checks their addresses
    header = (
        f"// autocomp-launch: {json.dumps(spec, separators=(',', ':'))}\n"
        f"// autocomp-compile {CODEGEN_VERSION}: {w.name}; schedule {sorted(knobs.items())}\n"
    )
    return header + _prelude(w.dtype) + body


def _prelude(dtype: str) -> str:
    elem = "typedef unsigned short elem_t;" if dtype == "bf16" else "typedef float elem_t;"
    to_f = "return __uint_as_float(((unsigned)v) << 16);" if dtype == "bf16" else "return v;"
    from_f = (
        "unsigned u = __float_as_uint(f);\n"
        "  if ((u & 0x7fffffffu) > 0x7f800000u) return (elem_t)((u >> 16) | 0x40u);\n"
        "  u += 0x7fffu + ((u >> 16) & 1u); return (elem_t)(u >> 16);"
        if dtype == "bf16"
        else "return f;"
    )
    float_overloads = (
        "__device__ __forceinline__ float to_f32(float v) { return v; }\n"
        "__device__ __forceinline__ void store_out(float *p, float v) { *p = v; }\n"
        if dtype == "bf16"
        else ""
    )
    return f"""
{elem}
#define EPV ((int)(16 / sizeof(elem_t)))  /* elements per 16-byte vector */
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
__device__ __forceinline__ float to_f32(elem_t v) {{ {to_f} }}
__device__ __forceinline__ elem_t from_f32(float f) {{
  {from_f}
}}
__device__ __forceinline__ void store_out(elem_t *p, float v) {{ *p = from_f32(v); }}
{float_overloads}
/* The 16-byte vector starting at p, widened to EPV floats. */
__device__ __forceinline__ void load_vec(const elem_t *__restrict__ p, float *f) {{
  const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(p));
  const elem_t *e = reinterpret_cast<const elem_t *>(&raw);
  #pragma unroll
  for (int i = 0; i < EPV; ++i) f[i] = to_f32(e[i]);
}}
__device__ __forceinline__ float warp_sum(float v) {{
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}}
__device__ __forceinline__ float warp_max(float v) {{
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}}
__device__ __forceinline__ float silu(float v) {{ return v / (1.0f + __expf(-v)); }}
"""


def _launch(name: str, grid: tuple[int, ...], block: int, args: list[str], smem: int = 0) -> dict[str, Any]:
    return {"name": name, "grid": list(grid) + [1] * (3 - len(grid)), "block": [block, 1, 1], "smem": smem, "args": args}


# ---------------------------------------------------------------- GEMV family


def _gemv_naive_kernel(name: str, x_t: str, out_t: str, M: int, N: int, K: int, two: bool) -> str:
    """One thread per output element, scalar loop over K (the translation of x @ w.T)."""
    w_args = "const elem_t *__restrict__ wa, const elem_t *__restrict__ wb" if two else "const elem_t *__restrict__ wa"
    acc = "float a = 0.0f, b = 0.0f;" if two else "float a = 0.0f;"
    step = "a += xv * to_f32(wa[(long)n * K + k]);" + (" b += xv * to_f32(wb[(long)n * K + k]);" if two else "")
    result = "silu(a) * b" if two else "a"
    return f"""
extern "C" __global__ void {name}(const {x_t} *__restrict__ x, {w_args}, {out_t} *__restrict__ out) {{
  const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  const int M = {M}, N = {N}, K = {K};
  if (idx >= (long)M * N) return;
  const int m = (int)(idx / N), n = (int)(idx % N);
  {acc}
  for (int k = 0; k < K; ++k) {{ const float xv = to_f32(x[(long)m * K + k]); {step} }}
  store_out(out + idx, {result});
}}
"""


def _l2_prefetch(total_bytes: int) -> str:
    """Each block asks L2 to fetch (and keep) its share of another weight, for the next kernel."""
    return f"""  {{
    const long total = {total_bytes}L, per = (total + gridDim.x - 1) / gridDim.x;
    const char *base = reinterpret_cast<const char *>(pf);
    const long beg = (long)blockIdx.x * per, end = beg + per < total ? beg + per : total;
    for (long o = beg + threadIdx.x * 128; o < end; o += (long)blockDim.x * 128)
      asm volatile("prefetch.global.L2::evict_last [%0];" :: "l"(base + o));
  }}
"""


_PDL_TRIGGER = """#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  /* the next kernel may start as blocks retire */
#endif
"""


def _pdl_wait(R: int) -> str:
    """Before the previous kernel has finished (programmatic dependent launch), ask L2 for this warp's
    slice of its weight rows; then wait for the previous kernel's results."""
    return f"""  for (int r = 0; r < {R}; ++r) {{
    const long row = n0 + r < N ? n0 + r : N - 1;
    const char *base = reinterpret_cast<const char *>(wa + row * (long)K + kbeg);
    for (int o = lane * 128; o < kslice * (int)sizeof(elem_t); o += 32 * 128)
      asm volatile("prefetch.global.L2 [%0];" :: "l"(base + o));
  }}
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
"""


def _gemv_tiled_kernel(
    name: str, x_t: str, out_t: str, M: int, N: int, K: int, two: bool, k: dict[str, Any], prefetch_bytes: int = 0,
    pdl: str = "",
) -> str:
    """Warps own row groups of R rows; S warps split K and reduce through shared memory; U x R
    16-byte (or scalar) weight loads are issued before any is used. `stream_loads` marks weight
    loads evict-first; `prefetch_bytes` > 0 adds an L2 prefetch of the `pf` argument. `pdl` is
    "trigger" (let the next kernel launch early) or "wait" (prefetch own weights, then wait for the
    previous kernel before reading x)."""
    W, R, S, U = k["warps"], k["rows"], k["ksplit"], k["unroll"]
    V = "EPV" if k["vec"] else "1"
    nw = 2 if two else 1
    w_args = "const elem_t *__restrict__ wa, const elem_t *__restrict__ wb" if two else "const elem_t *__restrict__ wa"
    if prefetch_bytes:
        w_args += ", const elem_t *__restrict__ pf"
    ld = "__ldcs" if k["stream_loads"] else "__ldg"
    # x written by the previous kernel while this one ran (PDL): read it through L2, not the read-only path
    x_at = (lambda i: f"__ldcg(x + {i})") if pdl == "wait" else (lambda i: f"x[{i}]")
    x_decl = (
        "  extern __shared__ float xs[];\n"
        f"  for (int i = threadIdx.x; i < M * K; i += blockDim.x) xs[i] = to_f32({x_at('i')});\n  __syncthreads();\n"
        "  #define XV(m, kk) xs[(m) * K + (kk)]\n"
        if k["x_smem"]
        else f"  #define XV(m, kk) to_f32({x_at('(long)(m) * K + (kk)')})\n"
    )
    raw_t = "uint4" if k["vec"] else "elem_t"
    if k["vec"]:
        load = "raw[{j}][u][r] = " + ld + "(reinterpret_cast<const uint4 *>({w} + row * (long)K + kk));"
        widen = "to_f32(reinterpret_cast<const elem_t *>(&raw[{j}][u][r])[e])"
    else:
        load = "raw[{j}][u][r] = " + ld + "({w} + row * (long)K + kk);"
        widen = "to_f32(raw[{j}][u][r])"
    loads = "\n".join("        " + load.format(w=("wa", "wb")[j], j=j) for j in range(nw))
    fma = "\n".join(f"          acc[{j}][m][r] += {widen.format(j=j)} * xe;" for j in range(nw))
    epilogue = "silu(tot[0]) * tot[1]" if two else "tot[0]"
    if k["vec"]:  # the activation, too, in 16-byte (shared: float4) loads: EPV elements as float into xv
        if k["x_smem"]:
            x_vec = ("#pragma unroll\n          for (int v = 0; v < EPV / 4; ++v) reinterpret_cast<float4 *>(xv)[v] = "
                     "reinterpret_cast<const float4 *>(xs + m * K + kk)[v];")
        elif x_t == "float":
            x_vec = ("#pragma unroll\n          for (int v = 0; v < EPV / 4; ++v) reinterpret_cast<float4 *>(xv)[v] = "
                     f"{'__ldcg' if pdl == 'wait' else '__ldg'}(reinterpret_cast<const float4 *>(x + (long)m * K + kk) + v);")
        else:
            x_vec = ("const uint4 xr = __ldg(reinterpret_cast<const uint4 *>(x + (long)m * K + kk));\n"
                     "          #pragma unroll\n"
                     "          for (int e = 0; e < EPV; ++e) xv[e] = to_f32(reinterpret_cast<const elem_t *>(&xr)[e]);")
        x_step = f"""      for (int m = 0; m < M; ++m) {{
          float xv[EPV];
          {x_vec}
          #pragma unroll
          for (int e = 0; e < EPV; ++e) {{
            const float xe = xv[e];
            #pragma unroll
            for (int r = 0; r < {R}; ++r) {{
{fma}
            }}
          }}
        }}"""
    else:
        x_step = f"""      for (int m = 0; m < M; ++m)
        #pragma unroll
        for (int e = 0; e < {V}; ++e) {{
          const float xe = XV(m, kk + e);
          #pragma unroll
          for (int r = 0; r < {R}; ++r) {{
{fma}
          }}
        }}"""
    return f"""
extern "C" __global__ void __launch_bounds__({W * 32}) {name}(const {x_t} *__restrict__ x, {w_args}, {out_t} *__restrict__ out) {{
  const int M = {M}, N = {N}, K = {K};
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int group = warp / {S}, slice = warp % {S};
  const long n0 = ((long)blockIdx.x * ({W} / {S}) + group) * {R};
  const int kslice = K / {S};
  const int kbeg = slice * kslice, kend = kbeg + kslice;
{_PDL_TRIGGER if pdl == "trigger" else ""}{_pdl_wait(R) if pdl == "wait" else ""}{_l2_prefetch(prefetch_bytes) if prefetch_bytes else ""}{x_decl}  float acc[{nw}][M][{R}];
  #pragma unroll
  for (int j = 0; j < {nw}; ++j)
    #pragma unroll
    for (int m = 0; m < M; ++m)
      #pragma unroll
      for (int r = 0; r < {R}; ++r) acc[j][m][r] = 0.0f;
  for (int k0 = kbeg + lane * {V}; k0 < kend; k0 += 32 * {V} * {U}) {{
    {raw_t} raw[{nw}][{U}][{R}];  /* all U x R loads issued before the first use */
    #pragma unroll
    for (int u = 0; u < {U}; ++u) {{
      const int kk = k0 + u * 32 * {V};
      #pragma unroll
      for (int r = 0; r < {R}; ++r) {{
        const long row = n0 + r < N ? n0 + r : N - 1;
        if (kk < kend) {{
{loads}
        }}
      }}
    }}
    #pragma unroll
    for (int u = 0; u < {U}; ++u) {{
      const int kk = k0 + u * 32 * {V};
      if (kk >= kend) break;
      #pragma unroll
{x_step}
    }}
  }}
  #pragma unroll
  for (int j = 0; j < {nw}; ++j)
    #pragma unroll
    for (int m = 0; m < M; ++m)
      #pragma unroll
      for (int r = 0; r < {R}; ++r) acc[j][m][r] = warp_sum(acc[j][m][r]);
  {f"__shared__ float red[{W}][{nw}][M][{R}];" if S > 1 else ""}
  if ({S} > 1) {{
    {"if (lane == 0) for (int j = 0; j < " + str(nw) + "; ++j) for (int m = 0; m < M; ++m) for (int r = 0; r < " + str(R) + "; ++r) red[warp][j][m][r] = acc[j][m][r];" if S > 1 else ""}
    __syncthreads();
  }}
  if (lane == 0 && slice == 0) {{
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < {R}; ++r) {{
        if (n0 + r >= N) continue;
        float tot[{nw}];
        for (int j = 0; j < {nw}; ++j) {{
          tot[j] = acc[j][m][r];
          {"for (int s = 1; s < " + str(S) + "; ++s) tot[j] += red[warp + s][j][m][r];" if S > 1 else ""}
        }}
        store_out(out + (long)m * N + n0 + r, {epilogue});
      }}
  }}
  #undef XV
}}
"""


def _gemv_stage(name: str, x_t: str, out_t: str, M: int, N: int, K: int, two: bool, k: dict[str, Any], args: list[str],
                prefetch_bytes: int = 0, pdl: str = ""):
    if k["naive"]:
        code = _gemv_naive_kernel(name, x_t, out_t, M, N, K, two)
        return code, _launch(name, (math.ceil(M * N / 128),), 128, args)
    rows_per_block = (k["warps"] // k["ksplit"]) * k["rows"]
    smem = M * K * 4 if k["x_smem"] else 0
    code = _gemv_tiled_kernel(name, x_t, out_t, M, N, K, two, k, prefetch_bytes, pdl)
    launch = _launch(name, (math.ceil(N / rows_per_block),), k["warps"] * 32, args, smem)
    if pdl == "wait":
        launch["pdl"] = True  # launched with programmatic stream serialization (sm_90+; the runtime decides)
    return code, launch


def _gate_up_row(row: str, U: int, ld: str, store: str) -> str:
    """One warp's SiLU(gate . x) * (up . x) for intermediate row `row` and every batch row m, from x staged
    as float in shared memory (`xs`); lane 0 then runs `store` with the two dot products in ta and tb."""
    return f"""    float a[M], b[M];
    #pragma unroll
    for (int m = 0; m < M; ++m) a[m] = b[m] = 0.0f;
    for (int k0 = lane * EPV; k0 < H; k0 += 32 * EPV * {U}) {{
      uint4 g[{U}], u[{U}];  /* every load of the step issued before the first use */
      #pragma unroll
      for (int q = 0; q < {U}; ++q) {{
        const int kk = k0 + q * 32 * EPV;
        if (kk < H) {{
          g[q] = {ld}(reinterpret_cast<const uint4 *>(wg + {row} * H + kk));
          u[q] = {ld}(reinterpret_cast<const uint4 *>(wu + {row} * H + kk));
        }}
      }}
      #pragma unroll
      for (int q = 0; q < {U}; ++q) {{
        const int kk = k0 + q * 32 * EPV;
        if (kk >= H) break;
        const elem_t *ge = reinterpret_cast<const elem_t *>(&g[q]);
        const elem_t *ue = reinterpret_cast<const elem_t *>(&u[q]);
        #pragma unroll
        for (int m = 0; m < M; ++m) {{
          float xv[EPV];
          #pragma unroll
          for (int v = 0; v < EPV / 4; ++v)
            reinterpret_cast<float4 *>(xv)[v] = reinterpret_cast<const float4 *>(xs + m * H + kk)[v];
          #pragma unroll
          for (int e = 0; e < EPV; ++e) {{
            a[m] += to_f32(ge[e]) * xv[e];
            b[m] += to_f32(ue[e]) * xv[e];
          }}
        }}
      }}
    }}
    #pragma unroll
    for (int m = 0; m < M; ++m) {{
      const float ta = warp_sum(a[m]), tb = warp_sum(b[m]);
      if (lane == 0) {store};
    }}
"""


def _mlp_fused_kernel(M: int, H: int, I: int, k: dict[str, Any]) -> str:
    """The whole SwiGLU MLP in one launch. Block b owns rows [b*C, (b+1)*C) of the intermediate
    dimension: its warps compute SiLU(gate) * up for those rows into shared memory, then the block
    multiplies them by its C columns of the down projection and adds the partial sums into an fp32
    accumulator with atomics. The last block to finish (a counter) writes the output and clears the
    accumulator and the counter for the next launch. No kernel waits on another."""
    W, U, C = k["warps"], k["unroll"], k["chunk"]
    ld = "__ldcs" if k["stream_loads"] else "__ldg"
    return f"""
extern "C" __global__ void __launch_bounds__({W * 32}) mlp_fused(const elem_t *__restrict__ x, const elem_t *__restrict__ wg,
    const elem_t *__restrict__ wu, const elem_t *__restrict__ wd, float *__restrict__ acc, unsigned int *__restrict__ count,
    elem_t *__restrict__ out) {{
  const int M = {M}, H = {H}, I = {I}, C = {C}, NT = {W * 32};
  const int T = C / EPV;  /* threads per down-projection row in phase 2 */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long j0 = (long)blockIdx.x * C;
  __shared__ __align__(16) float xs[M * H];
  __shared__ float hs[M * C];
  __shared__ bool last;
  for (int i = threadIdx.x; i < M * H; i += NT) xs[i] = to_f32(x[i]);
  __syncthreads();
  /* phase 1: hs[m][r] = SiLU(gate[j0 + r] . x[m]) * (up[j0 + r] . x[m]), one warp per row */
  for (int r = warp; r < C; r += {W}) {{
    const long row = j0 + r;
{_gate_up_row("row", U, ld, "hs[m * C + r] = silu(ta) * tb")}  }}
  __syncthreads();
  /* phase 2: acc[m][n] += wd[n][j0 : j0 + C] . hs[m], T threads per row n, EPV columns each */
  {{
    const int t = threadIdx.x % T, c0 = t * EPV, P = NT / T;
    float hv[M][EPV];
    #pragma unroll
    for (int m = 0; m < M; ++m)
      #pragma unroll
      for (int e = 0; e < EPV; ++e) hv[m][e] = hs[m * C + c0 + e];
    for (int base = 0; base < H; base += P * {U}) {{  /* trip count uniform across the block (shuffles below) */
      uint4 d[{U}];
      #pragma unroll
      for (int q = 0; q < {U}; ++q) {{
        const int n = base + q * P + threadIdx.x / T;
        d[q] = n < H ? {ld}(reinterpret_cast<const uint4 *>(wd + (long)n * I + j0 + c0)) : make_uint4(0u, 0u, 0u, 0u);
      }}
      #pragma unroll
      for (int q = 0; q < {U}; ++q) {{
        const int n = base + q * P + threadIdx.x / T;
        const elem_t *de = reinterpret_cast<const elem_t *>(&d[q]);
        #pragma unroll
        for (int m = 0; m < M; ++m) {{
          float s = 0.0f;
          #pragma unroll
          for (int e = 0; e < EPV; ++e) s += to_f32(de[e]) * hv[m][e];
          #pragma unroll
          for (int o = T / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
          if (t == 0 && n < H) atomicAdd(acc + (long)m * H + n, s);
        }}
      }}
    }}
  }}
  /* the last block to finish writes the output and leaves the accumulator and counter zeroed */
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(count, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) {{
    __threadfence();
    for (int i = threadIdx.x; i < M * H; i += NT) {{
      store_out(out + i, __ldcg(acc + i));
      acc[i] = 0.0f;
    }}
    if (threadIdx.x == 0) *count = 0u;
  }}
}}
"""


def _mlp_persistent_kernel(M: int, H: int, I: int, k: dict[str, Any]) -> str:
    """The whole SwiGLU MLP in one launch of co-resident blocks (the runtime checks that they all fit).
    Phase 1: warps take rows of gate/up in turn and write h = SiLU(gate . x) * (up . x) to global memory;
    a grid barrier; phase 2: every block copies h into shared memory and its warps take whole rows of the
    down projection in turn (contiguous reads, no atomics). With `l2_prefetch`, each warp first asks L2
    to fetch and keep its phase-2 rows, so that they stream from memory while phase 1 runs. The barrier's
    counter is left at zero (a generation number moves on), ready for the next launch."""
    W, U = k["warps"], k["unroll"]
    ld = "__ldcs" if k["stream_loads"] else "__ldg"
    prefetch = """  for (long n = gw; n < H; n += GW) {  /* this warp's phase-2 rows, to L2 */
    const char *row = reinterpret_cast<const char *>(wd + n * I);
    for (int o = lane * 128; o < I * (int)sizeof(elem_t); o += 32 * 128)
      asm volatile("prefetch.global.L2::evict_last [%0];" :: "l"(row + o));
  }
""" if k["l2_prefetch"] else ""
    return f"""
extern "C" __global__ void __launch_bounds__({W * 32}) mlp_persistent(const elem_t *__restrict__ x,
    const elem_t *__restrict__ wg, const elem_t *__restrict__ wu, const elem_t *__restrict__ wd, float *__restrict__ h,
    unsigned int *__restrict__ bar, elem_t *__restrict__ out) {{
  const int M = {M}, H = {H}, I = {I}, NT = {W * 32};
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long gw = (long)blockIdx.x * {W} + warp, GW = (long)gridDim.x * {W};
  extern __shared__ __align__(16) float smem[];
  float *xs = smem, *hs = smem + M * H;
{prefetch}  for (int i = threadIdx.x; i < M * H; i += NT) xs[i] = to_f32(x[i]);
  __syncthreads();
  /* phase 1: h[m][r] = SiLU(gate[r] . x[m]) * (up[r] . x[m]), one warp per row */
  for (long r = gw; r < I; r += GW) {{
{_gate_up_row("r", U, ld, "__stcg(h + (long)m * I + r, silu(ta) * tb)")}  }}
  /* grid barrier: every block has written its rows of h */
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {{
    volatile unsigned int *generation = bar + 1;
    const unsigned int g0 = *generation;
    __threadfence();
    if (atomicAdd(bar, 1u) == gridDim.x - 1) {{
      bar[0] = 0u;
      __threadfence();
      atomicAdd(bar + 1, 1u);
    }} else {{
      while (*generation == g0) __nanosleep(64);
    }}
    __threadfence();
  }}
  __syncthreads();
  for (int i = threadIdx.x * 4; i < M * I; i += NT * 4)
    *reinterpret_cast<float4 *>(hs + i) = __ldcg(reinterpret_cast<const float4 *>(h + i));
  __syncthreads();
  /* phase 2: out[m][n] = down[n] . h[m], one warp per row */
  for (long n = gw; n < H; n += GW) {{
    float a[M];
    #pragma unroll
    for (int m = 0; m < M; ++m) a[m] = 0.0f;
    for (int k0 = lane * EPV; k0 < I; k0 += 32 * EPV * {U}) {{
      uint4 d[{U}];
      #pragma unroll
      for (int q = 0; q < {U}; ++q) {{
        const int kk = k0 + q * 32 * EPV;
        if (kk < I) d[q] = {ld}(reinterpret_cast<const uint4 *>(wd + n * I + kk));
      }}
      #pragma unroll
      for (int q = 0; q < {U}; ++q) {{
        const int kk = k0 + q * 32 * EPV;
        if (kk >= I) break;
        const elem_t *de = reinterpret_cast<const elem_t *>(&d[q]);
        #pragma unroll
        for (int m = 0; m < M; ++m) {{
          float hv[EPV];
          #pragma unroll
          for (int v = 0; v < EPV / 4; ++v)
            reinterpret_cast<float4 *>(hv)[v] = reinterpret_cast<const float4 *>(hs + m * I + kk)[v];
          #pragma unroll
          for (int e = 0; e < EPV; ++e) a[m] += to_f32(de[e]) * hv[e];
        }}
      }}
    }}
    #pragma unroll
    for (int m = 0; m < M; ++m) {{
      const float t = warp_sum(a[m]);
      if (lane == 0) store_out(out + (long)m * H + n, t);
    }}
  }}
}}
"""


_RED_ADD_F32X4 = """
/* acc[0..3] += v, one 16-byte reduction in L2 where the GPU has it (sm_90), else four float atomics */
__device__ __forceinline__ void red_add_f32x4(float *acc, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(acc), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
#else
  atomicAdd(acc, v.x); atomicAdd(acc + 1, v.y); atomicAdd(acc + 2, v.z); atomicAdd(acc + 3, v.w);
#endif
}
"""


def _mlp_down_t_kernel(M: int, H: int, I: int, epv: int, k: dict[str, Any]) -> str:
    """The whole SwiGLU MLP in one launch that streams its three weights contiguously: the down projection is
    read transposed (intermediate x hidden, a copy made once per weight), so that intermediate row j of gate,
    up and down-transposed are three contiguous rows. Block b owns rows [b*C, (b+1)*C); a warp issues all
    16-byte loads of one row of each weight at once, reduces gate . x and up . x across its lanes, and adds
    SiLU(gate . x) * (up . x) times the down row to the partial output each lane holds in registers (its
    columns: the same as its loads). The block sums its warps' partial outputs in shared memory and adds them
    to an fp32 accumulator with 16-byte reductions; the last block to finish (a counter) writes the output and
    leaves the accumulator and counter zeroed for the next launch. Where 32 lanes' loads do not tile a row
    (small test shapes), lanes past its end load zeros and add nothing."""
    W, C = k["warps"], k["chunk"]
    ld = "__ldcs" if k["stream_loads"] else "__ldg"
    ragged = H % (32 * epv) != 0
    load = (lambda wt: f"col < H ? {ld}(reinterpret_cast<const uint4 *>({wt} + row + col)) : make_uint4(0u, 0u, 0u, 0u)"
            ) if ragged else (lambda wt: f"{ld}(reinterpret_cast<const uint4 *>({wt} + row + col))")
    weights = {"g": "wg", "u": "wu", "d": "wdt"}
    S = slots_for(W)
    per_thread = -(-M * H // 4 // (W * 32))
    if epv == 8:  # bf16: four outputs packed into 8 bytes
        store4 = ("        uint2 p;\n"
                  "        p.x = (unsigned)from_f32(v[k].x) | ((unsigned)from_f32(v[k].y) << 16);\n"
                  "        p.y = (unsigned)from_f32(v[k].z) | ((unsigned)from_f32(v[k].w) << 16);\n"
                  "        reinterpret_cast<uint2 *>(out)[i] = p;")
    else:
        store4 = "        reinterpret_cast<float4 *>(out)[i] = v[k];"

    def slot_pass(who: str, slot: str, add: bool) -> str:
        """Warps `who` write (or add) their partial outputs into slot `slot`."""
        value = ("make_float4(o[m][q][4 * v], o[m][q][4 * v + 1], o[m][q][4 * v + 2], o[m][q][4 * v + 3])")
        update = ("          float4 t = p[i];\n          t.x += o[m][q][4 * v]; t.y += o[m][q][4 * v + 1]; "
                  "t.z += o[m][q][4 * v + 2]; t.w += o[m][q][4 * v + 3];\n          p[i] = t;\n") if add else (
                  f"          p[i] = {value};\n")
        return (f"  if ({who}) {{\n    float4 *p = slots + ({slot}) * F;\n    #pragma unroll\n    for (int m = 0; m < M; ++m)\n"
                "      #pragma unroll\n      for (int q = 0; q < NQ; ++q)\n        #pragma unroll\n"
                "        for (int v = 0; v < HV; ++v) {\n          const int i = ((m * NQ + q) * HV + v) * 32 + lane;\n"
                f"{update}        }}\n  }}\n")

    def row_loads(r: str, regs: tuple[str, ...], pad: str = "      ") -> str:
        """16-byte loads of intermediate row `r` of the weights behind registers `regs`."""
        lines = [f"const long row = (j0 + {r}) * H;", "#pragma unroll", "for (int q = 0; q < NQ; ++q) {",
                 "  const int col = (q * 32 + lane) * EPV;", *(f"  {reg}[q] = {load(weights[reg])};" for reg in regs), "}"]
        return "".join(f"{pad}{line}\n" for line in lines)
    return _RED_ADD_F32X4 + f"""
extern "C" __global__ void __launch_bounds__({W * 32}) mlp_down_t(const elem_t *__restrict__ x,
    const elem_t *__restrict__ wg, const elem_t *__restrict__ wu, const elem_t *__restrict__ wdt,
    float *__restrict__ acc, unsigned int *__restrict__ count, elem_t *__restrict__ out) {{
  const int M = {M}, H = {H}, C = {C}, NT = {W * 32}, S = {S};
  const int NQ = (H + 32 * EPV - 1) / (32 * EPV);  /* 16-byte loads per lane per weight row */
  const int HV = EPV / 4, F = M * NQ * HV * 32;  /* float4s per lane per load; float4s per slot */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long j0 = (long)blockIdx.x * C;
  uint4 g[NQ], u[NQ], d[NQ];  /* one row of each weight, loaded before first use: the first before x is staged */
  {{
{row_loads("warp", ("g", "u", "d"), "    ")}  }}
  /* x as float, zero past the row's end, in the slots' lane-contiguous float4 order (no bank conflicts): float4
     ((m * NQ + q) * HV + v) * 32 + lane holds columns (q * 32 + lane) * EPV + 4 * v .. + 3 of row m */
  __shared__ __align__(16) float xs[M * NQ * 32 * EPV];
  __shared__ __align__(16) float red[S * M * NQ * 32 * EPV];  /* S slots of the block's partial output */
  __shared__ bool last;
  for (int i = threadIdx.x; i < F; i += NT) {{
    const int lane_i = i % 32, v = (i / 32) % HV, q = (i / 32 / HV) % NQ, m = i / 32 / HV / NQ;
    const int col = (q * 32 + lane_i) * EPV + 4 * v;  /* H % 4 == 0: all four columns in the row or none */
    const elem_t *xp = x + m * H + col;
    reinterpret_cast<float4 *>(xs)[i] = col < H ? make_float4(to_f32(xp[0]), to_f32(xp[1]), to_f32(xp[2]), to_f32(xp[3]))
                                                : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }}
  __syncthreads();
  float o[M][NQ][EPV];  /* this lane's share of the block's partial output: columns (q * 32 + lane) * EPV + e */
  #pragma unroll
  for (int m = 0; m < M; ++m)
    #pragma unroll
    for (int q = 0; q < NQ; ++q)
      #pragma unroll
      for (int e = 0; e < EPV; ++e) o[m][q][e] = 0.0f;
  for (int r = warp; r < C; r += {W}) {{
    const int next = r + {W};
    float a[M], b[M];
    #pragma unroll
    for (int m = 0; m < M; ++m) a[m] = b[m] = 0.0f;
    #pragma unroll
    for (int q = 0; q < NQ; ++q) {{
      const elem_t *ge = reinterpret_cast<const elem_t *>(&g[q]);
      const elem_t *ue = reinterpret_cast<const elem_t *>(&u[q]);
      #pragma unroll
      for (int m = 0; m < M; ++m) {{
        float xv[EPV];
        #pragma unroll
        for (int v = 0; v < EPV / 4; ++v)
          reinterpret_cast<float4 *>(xv)[v] = reinterpret_cast<const float4 *>(xs)[((m * NQ + q) * HV + v) * 32 + lane];
        #pragma unroll
        for (int e = 0; e < EPV; ++e) {{
          a[m] += to_f32(ge[e]) * xv[e];
          b[m] += to_f32(ue[e]) * xv[e];
        }}
      }}
    }}
    if (next < C) {{  /* g and u are used: the next row's gate and up loads go out during the rest */
{row_loads("next", ("g", "u"))}    }}
    #pragma unroll
    for (int m = 0; m < M; ++m) {{
      const float h = silu(warp_sum(a[m])) * warp_sum(b[m]);  /* every lane gets the sums */
      #pragma unroll
      for (int q = 0; q < NQ; ++q) {{
        const elem_t *de = reinterpret_cast<const elem_t *>(&d[q]);
        #pragma unroll
        for (int e = 0; e < EPV; ++e) o[m][q][e] += h * to_f32(de[e]);
      }}
    }}
    if (next < C) {{
{row_loads("next", ("d",))}    }}
  }}
  /* the block's partial output, without shared atomics: warps 0..S-1 store theirs in slot `warp`, then warps
     S..W-1 add theirs into slot `warp - S`; float4 ((m * NQ + q) * HV + v) * 32 + lane of a slot is lane-contiguous
     (no bank conflicts) and holds columns (q * 32 + lane) * EPV + 4 * v .. + 3 of row m */
  float4 *slots = reinterpret_cast<float4 *>(red);
{slot_pass("warp < S", "warp", False)}  __syncthreads();
{slot_pass("warp >= S", "warp - S", True) if S < W else ""}  __syncthreads();
  for (int f = threadIdx.x; f < F; f += NT) {{
    float4 t = slots[f];
    #pragma unroll
    for (int s = 1; s < S; ++s) {{
      const float4 v = slots[s * F + f];
      t.x += v.x; t.y += v.y; t.z += v.z; t.w += v.w;
    }}
    const int lane_f = f % 32, v = (f / 32) % HV, q = (f / 32 / HV) % NQ, m = f / 32 / HV / NQ;
    const int col = (q * 32 + lane_f) * EPV + 4 * v;
    {"if (col < H) " if ragged else ""}red_add_f32x4(acc + m * H + col, t);
  }}
  /* the last block to finish writes the output and leaves the accumulator and counter zeroed */
  __syncthreads();
  if (threadIdx.x == 0) {{
    __threadfence();  /* cumulative: orders the block's reductions (before the barrier) before the count */
    last = atomicAdd(count, 1u) == gridDim.x - 1;
    if (last) __threadfence();
  }}
  __syncthreads();
  if (last) {{
    float4 *acc4 = reinterpret_cast<float4 *>(acc);
    float4 v[{per_thread}];
    #pragma unroll
    for (int k = 0; k < {per_thread}; ++k) {{  /* every load first, then the stores */
      const int i = threadIdx.x + k * NT;
      if (i < M * H / 4) v[k] = __ldcg(acc4 + i);
    }}
    #pragma unroll
    for (int k = 0; k < {per_thread}; ++k) {{
      const int i = threadIdx.x + k * NT;
      if (i < M * H / 4) {{
{store4}
        acc4[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }}
    }}
    if (threadIdx.x == 0) *count = 0u;
  }}
}}
"""


def _gemv(w: Workload, k: dict[str, Any]):
    M, N, K = _gemv_shape(w)
    if k["mma"]:
        return _gemv_mma(w, k)
    if w.kind != "mlp":
        code, launch = _gemv_stage("gemv", "elem_t", "elem_t", M, N, K, False, k, ["x", "w", "out"])
        return [launch], {}, code
    H, I = w.params["hidden"], w.params["intermediate"]
    if k["down_t"]:
        launch = _launch("mlp_down_t", (I // k["chunk"],), k["warps"] * 32,
                         ["x", "w_gate", "w_up", "@w_down_t", "$acc", "$count", "out"])
        code = _mlp_down_t_kernel(M, H, I, 16 // _elem_bytes(w), k)
        return [launch], {"acc": [M * H, "fp32"], "count": [1, "u32"]}, code
    if k["fuse_down"]:
        launch = _launch("mlp_fused", (I // k["chunk"],), k["warps"] * 32,
                         ["x", "w_gate", "w_up", "w_down", "$acc", "$count", "out"])
        return [launch], {"acc": [M * H, "fp32"], "count": [1, "u32"]}, _mlp_fused_kernel(M, H, I, k)
    if k["persistent"]:
        launch = _launch("mlp_persistent", (f"sms*{k['per_sm']}",), k["warps"] * 32,
                         ["x", "w_gate", "w_up", "w_down", "$h", "$barrier", "out"], smem=(M * H + M * I) * 4)
        launch["cooperative"] = True  # all blocks must be resident at once: the runtime checks it
        return [launch], {"h": [M * I, "fp32"], "barrier": [2, "u32"]}, _mlp_persistent_kernel(M, H, I, k)
    scratch = {"h": [M * I, "fp32"]}
    parts, launches = [], []
    if k["fuse"]:
        prefetch = H * I * _elem_bytes(w) if k["l2_prefetch"] and not k["naive"] else 0
        args = ["x", "w_gate", "w_up"] + (["w_down"] if prefetch else []) + ["$h"]  # kernel order: x, weights, pf, out
        code, launch = _gemv_stage("gate_up", "elem_t", "float", M, I, H, True, k, args, prefetch,
                                   "trigger" if k["pdl"] else "")
        parts.append(code)
        launches.append(launch)
    else:
        scratch.update({"g": [M * I, "fp32"], "u": [M * I, "fp32"]})
        for name, wname, buf in (("gate", "w_gate", "$g"), ("up", "w_up", "$u")):
            code, launch = _gemv_stage(name, "elem_t", "float", M, I, H, False, k, ["x", wname, buf])
            parts.append(code)
            launches.append(launch)
        parts.append(f"""
extern "C" __global__ void silu_mul(const float *__restrict__ g, const float *__restrict__ u, float *__restrict__ h) {{
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < {M * I}) h[i] = silu(g[i]) * u[i];
}}
""")
        launches.append(_launch("silu_mul", (math.ceil(M * I / 256),), 256, ["$g", "$u", "$h"]))
    code, launch = _gemv_stage("down", "float", "elem_t", M, H, I, False, down_stage(k), ["$h", "w_down", "out"],
                               pdl="wait" if k["pdl"] else "")
    parts.append(code)
    launches.append(launch)
    return launches, scratch, "".join(parts)


def _gemv_mma(w: Workload, k: dict[str, Any]):
    """Tensor-core kernels: one GEMM, or for the MLP gate/up with SiLU * mul (h in bf16, as PyTorch rounds
    it) and then down."""
    M, N, K = _gemv_shape(w)
    threads = k["warps"] * 32
    if w.kind != "mlp":
        code, smem, grid = mma.kernel("gemm_mma", "elem_t", M, N, K, False, k)
        return [_launch("gemm_mma", grid, threads, ["x", "w", "out"], smem)], {}, mma.HELPERS + code
    H, I = w.params["hidden"], w.params["intermediate"]
    gate_up, smem_gu, grid_gu = mma.kernel("gate_up_mma", "elem_t", M, I, H, True, k)
    down, smem_d, grid_d = mma.kernel("down_mma", "elem_t", M, H, I, False, k)
    launches = [_launch("gate_up_mma", grid_gu, threads, ["x", "w_gate", "w_up", "$h"], smem_gu),
                _launch("down_mma", grid_d, threads, ["$h", "w_down", "out"], smem_d)]
    return launches, {"h": [M * I, "bf16"]}, mma.HELPERS + gate_up + down


# ---------------------------------------------------------------- RMSNorm


def _rmsnorm(w: Workload, k: dict[str, Any]):
    R, H, eps = w.params["rows"], w.params["hidden"], float(w.params["eps"])
    T = k["threads"]
    if k["naive"]:
        code = f"""
extern "C" __global__ void rmsnorm(const elem_t *__restrict__ x, const elem_t *__restrict__ wt, elem_t *__restrict__ out) {{
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= {R}) return;
  float ss = 0.0f;
  for (int h = 0; h < {H}; ++h) {{ const float v = to_f32(x[(long)r * {H} + h]); ss += v * v; }}
  const float inv = rsqrtf(ss / {H} + {eps!r}f);
  for (int h = 0; h < {H}; ++h) out[(long)r * {H} + h] = from_f32(to_f32(x[(long)r * {H} + h]) * inv * to_f32(wt[h]));
}}
"""
        return [_launch("rmsnorm", (math.ceil(R / 128),), 128, ["x", "weight", "out"])], {}, code
    V = "EPV" if k["vec"] else "1"
    load = "load_vec(xr + h, v);" if k["vec"] else "v[0] = to_f32(xr[h]);"
    loadw = "load_vec(wt + h, g);" if k["vec"] else "g[0] = to_f32(wt[h]);"
    code = f"""
extern "C" __global__ void __launch_bounds__({T}) rmsnorm(const elem_t *__restrict__ x, const elem_t *__restrict__ wt, elem_t *__restrict__ out) {{
  const elem_t *xr = x + (long)blockIdx.x * {H};
  elem_t *orow = out + (long)blockIdx.x * {H};
  float ss = 0.0f, v[{V}], g[{V}];
  for (int h = threadIdx.x * {V}; h < {H}; h += {T} * {V}) {{
    {load}
    #pragma unroll
    for (int e = 0; e < {V}; ++e) ss += v[e] * v[e];
  }}
  __shared__ float part[32];
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {{
    float t = threadIdx.x < {T // 32 if T >= 32 else 1} ? part[threadIdx.x] : 0.0f;
    t = warp_sum(t);
    if (threadIdx.x == 0) part[0] = t;
  }}
  __syncthreads();
  const float inv = rsqrtf(part[0] / {H} + {eps!r}f);
  for (int h = threadIdx.x * {V}; h < {H}; h += {T} * {V}) {{
    {load}
    {loadw}
    #pragma unroll
    for (int e = 0; e < {V}; ++e) orow[h + e] = from_f32(v[e] * inv * g[e]);
  }}
}}
"""
    return [_launch("rmsnorm", (R,), T, ["x", "weight", "out"])], {}, code


# ---------------------------------------------------------------- GQA attention


def _attention(w: Workload, k: dict[str, Any]):
    p = w.params
    B, HQ, HK, D = p["batch"], p["heads"], p["kv_heads"], p["head_dim"]
    G = HQ // HK
    decode = p["phase"] == "decode"
    S = p["max_kv_len"] if decode else p["seq_len"]
    scale = 1.0 / math.sqrt(D)
    defs = f"#define B {B}\n#define HQ {HQ}\n#define HK {HK}\n#define D {D}\n#define G {G}\n#define S {S}\n"
    args = ["q", "k_cache", "v_cache", "out"] if decode else ["q", "k", "v", "out"]
    if k["naive"]:
        return _attention_naive(w, defs, args, decode, scale)
    if k["mma"]:
        code, grid, threads = mma.attention_kernel(B, HQ, HK, S, D, scale, k)
        return [_launch("attention_mma", grid, threads, args)], {}, mma.HELPERS + code
    return _attention_flash(w, k, defs, args, decode, scale)


def _attention_naive(w: Workload, defs: str, args: list[str], decode: bool, scale: float):
    """One block per query row: scores to global scratch, block-wide max and sum, then P @ V."""
    p = w.params
    rows = p["batch"] * p["heads"] * (1 if decode else p["seq_len"])
    S = p["max_kv_len"] if decode else p["seq_len"]
    code = defs + f"""
__device__ float block_reduce(float v, bool is_max, float *buf) {{
  v = is_max ? warp_max(v) : warp_sum(v);
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = is_max ? -INFINITY : 0.0f;
  for (int i = 0; i < (int)(blockDim.x >> 5); ++i) t = is_max ? fmaxf(t, buf[i]) : t + buf[i];
  __syncthreads();
  return t;
}}
extern "C" __global__ void attention(const elem_t *__restrict__ q, const elem_t *__restrict__ kc, const elem_t *__restrict__ vc,
                                     elem_t *__restrict__ out, float *__restrict__ scores, long L) {{
  __shared__ float buf[32];
  const long row = blockIdx.x;                     /* (b, hq, i) */
  const long i = {"0" if decode else "row % S"};
  const long bh = {"row" if decode else "row / S"};
  const long b = bh / HQ, hq = bh % HQ, hk = hq / G;
  const long n = {"L" if decode else "i + 1"};
  const elem_t *qr = q + row * D;
  const elem_t *kb = kc + (b * HK + hk) * (long)S * D;
  const elem_t *vb = vc + (b * HK + hk) * (long)S * D;
  float *s = scores + row * (long)S;
  float mx = -INFINITY;
  for (long j = threadIdx.x; j < n; j += blockDim.x) {{
    float dot = 0.0f;
    for (int d = 0; d < D; ++d) dot += to_f32(qr[d]) * to_f32(kb[j * D + d]);
    s[j] = dot * {scale!r}f;
    mx = fmaxf(mx, s[j]);
  }}
  mx = block_reduce(mx, true, buf);
  float sum = 0.0f;
  for (long j = threadIdx.x; j < n; j += blockDim.x) {{ s[j] = __expf(s[j] - mx); sum += s[j]; }}
  sum = block_reduce(sum, false, buf);
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {{
    float acc = 0.0f;
    for (long j = 0; j < n; ++j) acc += s[j] * to_f32(vb[j * D + d]);
    out[row * D + d] = from_f32(acc / sum);
  }}
}}
"""
    launch = _launch("attention", (rows,), 128, args + ["$scores", "#kv_len" if decode else "#_seq"])
    spec_args = launch["args"]
    if not decode:
        spec_args[-1] = f"={S}"  # a constant: prefill length is static
    return [launch], {"scores": [rows * S, "fp32"]}, code


def _attention_flash(w: Workload, k: dict[str, Any], defs: str, args: list[str], decode: bool, scale: float):
    """Warp-per-key online softmax. Decode splits the KV length over `splits` blocks (flash-decoding)
    and merges partial results in a second kernel; `gqa_share` lets one warp serve all G query heads
    of a KV head; prefill gives each warp `q_block` query rows."""
    p = w.params
    B, HQ, HK, D = p["batch"], p["heads"], p["kv_heads"], p["head_dim"]
    W, SPLITS, QB = k["warps"], k["splits"], k["q_block"]
    HPW = (HQ // HK) if k["gqa_share"] else 1  # query heads per warp
    NQ = HPW * QB  # query rows per warp
    DPL = math.ceil(D / 32)  # head-dim elements per lane (lane, lane + 32, ...)
    S = p["max_kv_len"] if decode else p["seq_len"]
    head_groups = HQ // HPW
    if decode:
        n_rows = 1
        grid = (B * head_groups, SPLITS)
        row_blocks = 1
    else:
        n_rows = p["seq_len"]
        row_blocks = math.ceil(n_rows / (W * QB))
        grid = (B * head_groups, row_blocks)
    code = defs + f"""
#define W {W}
#define NQ {NQ}
#define HPW {HPW}
#define QB {QB}
#define DPL {DPL}
#define SPLITS {SPLITS}
extern "C" __global__ void __launch_bounds__(W * 32) attention(const elem_t *__restrict__ q, const elem_t *__restrict__ kc,
    const elem_t *__restrict__ vc, elem_t *__restrict__ out, float *__restrict__ part_o, float *__restrict__ part_ml, long L) {{
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long b = blockIdx.x / {head_groups}, hq0 = (blockIdx.x % {head_groups}) * HPW, hk = hq0 / G;
  const elem_t *kb = kc + (b * HK + hk) * (long)S * D;
  const elem_t *vb = vc + (b * HK + hk) * (long)S * D;
  /* this warp's query rows: HPW heads x QB consecutive positions */
  const long i0 = {"0" if decode else "((long)blockIdx.y * W + warp) * QB"};
  float qv[NQ][DPL], acc[NQ][DPL], m[NQ], l[NQ];
  long lim[NQ];
  #pragma unroll
  for (int r = 0; r < NQ; ++r) {{
    const long hq = hq0 + r / QB, i = i0 + r % QB;
    lim[r] = {"L" if decode else "(i < S ? i + 1 : 0)"};
    const long qrow = {"(b * HQ + hq)" if decode else "((b * HQ + hq) * S + (i < S ? i : 0))"};
    #pragma unroll
    for (int e = 0; e < DPL; ++e) {{
      const int d = e * 32 + lane;
      qv[r][e] = d < D ? to_f32(q[qrow * D + d]) * {scale!r}f : 0.0f;
      acc[r][e] = 0.0f;
    }}
    m[r] = -INFINITY; l[r] = 0.0f;
  }}
  long jbeg, jend, jstep;
  {"" if not decode else '''
  const long chunk = (L + SPLITS - 1) / SPLITS;
  jbeg = blockIdx.y * chunk + warp; jend = min(L, (long)(blockIdx.y + 1) * chunk); jstep = W;'''}
  {"" if decode else '''
  jbeg = 0; jend = 0; jstep = 1;
  #pragma unroll
  for (int r = 0; r < NQ; ++r) jend = max(jend, lim[r]);'''}
  for (long j = jbeg; j < jend; j += jstep) {{
    float kf[DPL], vf[DPL];
    #pragma unroll
    for (int e = 0; e < DPL; ++e) {{
      const int d = e * 32 + lane;
      kf[e] = d < D ? to_f32(kb[j * D + d]) : 0.0f;
      vf[e] = d < D ? to_f32(vb[j * D + d]) : 0.0f;
    }}
    #pragma unroll
    for (int r = 0; r < NQ; ++r) {{
      float s = 0.0f;
      #pragma unroll
      for (int e = 0; e < DPL; ++e) s += qv[r][e] * kf[e];
      s = warp_sum(s);
      if (j >= lim[r]) continue;
      const float mn = fmaxf(m[r], s);
      const float corr = __expf(m[r] - mn), pr = __expf(s - mn);
      l[r] = l[r] * corr + pr;
      #pragma unroll
      for (int e = 0; e < DPL; ++e) acc[r][e] = acc[r][e] * corr + pr * vf[e];
      m[r] = mn;
    }}
  }}
{_attention_epilogue(decode, D)}
}}
"""
    launches = [_launch("attention", grid, W * 32, args + ["$part_o", "$part_ml", "#kv_len" if decode else f"={S}"])]
    rows_total = B * HQ
    scratch: dict[str, list] = {"part_o": [1, "fp32"], "part_ml": [1, "fp32"]}
    if decode:
        scratch = {"part_o": [rows_total * SPLITS * W * D, "fp32"], "part_ml": [rows_total * SPLITS * W * 2, "fp32"]}
        code += _attention_combine(SPLITS * W, D)
        launches.append(_launch("combine", (rows_total,), 32 * max(1, math.ceil(D / 32)), ["$part_o", "$part_ml", "out"]))
    return launches, scratch, code


def _attention_epilogue(decode: bool, D: int) -> str:
    if decode:
        # Every warp of every split writes its partial (unnormalised acc, max, sum) for combine().
        return """
  #pragma unroll
  for (int r = 0; r < NQ; ++r) {
    const long hq = hq0 + r / QB;
    const long slot = ((b * HQ + hq) * SPLITS + blockIdx.y) * W + warp;
    #pragma unroll
    for (int e = 0; e < DPL; ++e) { const int d = e * 32 + lane; if (d < D) part_o[slot * D + d] = acc[r][e]; }
    if (lane == 0) { part_ml[slot * 2] = m[r]; part_ml[slot * 2 + 1] = l[r]; }
  }"""
    return """
  #pragma unroll
  for (int r = 0; r < NQ; ++r) {
    const long hq = hq0 + r / QB, i = i0 + r % QB;
    if (i >= S || l[r] == 0.0f) continue;
    #pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int d = e * 32 + lane;
      if (d < D) out[((b * HQ + hq) * S + i) * D + d] = from_f32(acc[r][e] / l[r]);
    }
  }"""


def _attention_combine(parts: int, D: int) -> str:
    return f"""
extern "C" __global__ void combine(const float *__restrict__ part_o, const float *__restrict__ part_ml, elem_t *__restrict__ out) {{
  const long row = blockIdx.x;  /* (b, hq) */
  const int d = threadIdx.x;
  float mx = -INFINITY;
  for (int p = 0; p < {parts}; ++p) mx = fmaxf(mx, part_ml[(row * {parts} + p) * 2]);
  float sum = 0.0f, acc = 0.0f;
  for (int p = 0; p < {parts}; ++p) {{
    const float mp = part_ml[(row * {parts} + p) * 2];
    if (mp == -INFINITY) continue;
    const float c = __expf(mp - mx);
    sum += c * part_ml[(row * {parts} + p) * 2 + 1];
    if (d < {D}) acc += c * part_o[(row * {parts} + p) * {D} + d];
  }}
  if (d < {D}) out[row * {D} + d] = from_f32(acc / sum);
}}
"""
