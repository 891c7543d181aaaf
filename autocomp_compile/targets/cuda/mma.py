"""Tensor-core GEMM for prefill-shaped GEMV-family workloads (bf16, sm_80+).

`Y[M, N] = X[M, K] @ W[N, K]^T` (two weights and SiLU(first) * second for the MLP's gate/up stage) with
`mma.sync.m16n8k16` (bf16 in, fp32 accumulators): blocks own `tile_m x tile_n` output tiles, their warps a
grid of 16x8 fragments; K advances 32 columns at a time through a ring of `stages` shared-memory tiles
filled with `cp.async` (plain 16-byte loads when `stages` is 1). Rows past M are zero-filled and never
stored, so M is free; N and K must be multiples of the tile width and 32.

Fragment layouts (PTX ISA, `mma.m16n8k16` with `.bf16`), for lane = 4 * g + t:
A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
B (16x8, "col": W's rows are B's columns): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g];
C (16x8 fp32): c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1].
"""
from __future__ import annotations

from typing import Any

BK = 32  # K columns per shared-memory tile: two mma k-steps
PAD = 8  # bf16 of padding per shared-memory row: fragment reads hit 32 different banks
SMEM_CAP = 96 * 1024  # two blocks per SM on an A100 (163 KB) and on Hopper (227 KB)
MAX_ACCUMULATORS = 128  # fp32 accumulators per thread

HELPERS = """
#ifndef AUTOCOMP_HOST_EMULATION
/* d += a (16x16 bf16) . b (16x8 bf16), fp32 accumulate: one warp-wide tensor-core instruction */
__device__ __forceinline__ void mma_bf16_16816(float *d, const unsigned *a, const unsigned *b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
/* 16 bytes global -> shared without a register round trip; zero-filled when !valid */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(s), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
#define CP_ASYNC_WAIT(n) asm volatile("cp.async.wait_group " #n ";" ::: "memory")
/* four (two) 8x8 bf16 matrices from shared memory, one row address per lane (lanes 0-7: matrix 0, ...):
   register j of lane 4g + t holds row g, columns 2t and 2t + 1 of matrix j */
__device__ __forceinline__ void ldmatrix_x4(unsigned *r, const elem_t *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"((unsigned)__cvta_generic_to_shared(row)));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned *r, const elem_t *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"((unsigned)__cvta_generic_to_shared(row)));
}
#define DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
__device__ __forceinline__ void copy16(void *smem, const void *gmem, bool valid) {
  const uint4 zero = {0u, 0u, 0u, 0u};
  *reinterpret_cast<uint4 *>(smem) = valid ? *reinterpret_cast<const uint4 *>(gmem) : zero;
}
__device__ __forceinline__ unsigned ld_pair(const elem_t *p) { return *reinterpret_cast<const unsigned *>(p); }
"""


def warp_grid(k: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(warps along M, warps along N, 16-row fragments per warp, 8-column fragments per warp): of the ways
    to lay the warps over the tile, the one that reads the fewest shared-memory words per mma; None if the
    tile is too small for that many warps."""
    best = None
    wm = 1
    while wm <= k["warps"]:
        wn = k["warps"] // wm
        if wm * 16 <= k["tile_m"] and wn * 8 <= k["tile_n"]:
            tm, tn = k["tile_m"] // 16 // wm, k["tile_n"] // 8 // wn
            words_per_mma = (4 * tm + 2 * tn) / (tm * tn)
            if best is None or words_per_mma <= best[0]:
                best = (words_per_mma, wm, wn, tm, tn)
        wm *= 2
    return None if best is None else best[1:]


def smem_bytes(k: dict[str, Any], weights: int) -> int:
    return k["stages"] * (k["tile_m"] + weights * k["tile_n"]) * (BK + PAD) * 2


def legalize(k: dict[str, Any], m: int, ns: list[int], ks: list[int], weights: int) -> bool:
    """Clamp tile_m / tile_n / warps / stages in `k` for `m` rows, output widths `ns` and reduction lengths
    `ks` of every stage; False when the shapes rule tensor cores out."""
    if any(n % 16 for n in ns) or any(kk % BK for kk in ks):
        return False
    while any(n % k["tile_n"] for n in ns):
        k["tile_n"] //= 2
    while k["tile_m"] > 16 and k["tile_m"] >= 2 * (-(-m // 16) * 16):
        k["tile_m"] //= 2  # no tile twice as tall as the rows there are
    while warp_grid(k) is None:
        k["warps"] //= 2
    while weights * warp_grid(k)[2] * warp_grid(k)[3] * 4 > MAX_ACCUMULATORS:
        if k["tile_n"] >= k["tile_m"] and k["tile_n"] > 16:
            k["tile_n"] //= 2
        else:
            k["tile_m"] //= 2
        while warp_grid(k) is None:
            k["warps"] //= 2
    while k["stages"] > 1 and smem_bytes(k, weights) > SMEM_CAP:
        k["stages"] -= 1
    return True


def kernel(name: str, out_t: str, M: int, N: int, K: int, two: bool, k: dict[str, Any]) -> tuple[str, int, tuple]:
    """Source of one tensor-core GEMM kernel, its dynamic shared memory and its grid."""
    BM, BN, S = k["tile_m"], k["tile_n"], k["stages"]
    _, WN, TM, TN = warp_grid(k)
    NB = 2 if two else 1
    T = k["warps"] * 32
    KP = BK + PAD
    w_args = "const elem_t *__restrict__ wa, const elem_t *__restrict__ wb" if two else "const elem_t *__restrict__ wa"
    w_row = "(r < {BN} ? wa + (long)(n0 + r) * K : wb + (long)(n0 + r - {BN}) * K)".format(BN=BN) if two else \
        "wa + (long)(n0 + r) * K"
    copy = "cp_async16" if S > 1 else "copy16"
    if S > 1:
        main_loop = f"""  #pragma unroll
  for (int s = 0; s < {S - 1}; ++s) {{
    if (s < KT) load_tile(s, s * {BK});
    cp_async_commit();
  }}
  for (int kt = 0; kt < KT; ++kt) {{
    CP_ASYNC_WAIT({S - 2});  /* this thread's copies of tile kt have landed */
    __syncthreads();         /* everyone's have; and everyone is done with the stage refilled next */
    if (kt + {S - 1} < KT) load_tile((kt + {S - 1}) % {S}, (kt + {S - 1}) * {BK});
    cp_async_commit();
    mma_tile(kt % {S});
  }}"""
    else:
        main_loop = f"""  for (int kt = 0; kt < KT; ++kt) {{
    load_tile(0, kt * {BK});
    __syncthreads();
    mma_tile(0);
    __syncthreads();
  }}"""
    value = "silu(acc[0][i][j][h * 2 + e]) * acc[1][i][j][h * 2 + e]" if two else "acc[0][i][j][h * 2 + e]"
    fragments = _ldmatrix_fragments(BN, KP, TM, TN, NB) if k["ldmatrix"] else _paired_fragments(BN, KP, TM, TN, NB)
    code = f"""
extern "C" __global__ void __launch_bounds__({T}) {name}(const elem_t *__restrict__ x, {w_args}, {out_t} *__restrict__ out) {{
  const int M = {M}, N = {N}, K = {K}, KT = K / {BK};
  DYNAMIC_SMEM(smem_raw);
  elem_t *xs = reinterpret_cast<elem_t *>(smem_raw);  /* [{S}][{BM}][{KP}] activation tiles */
  elem_t *ws = xs + {S * BM * KP};                      /* [{S}][{NB * BN}][{KP}] weight tiles */
  const int m0 = blockIdx.y * {BM}, n0 = blockIdx.x * {BN};
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wm = warp / {WN}, wn = warp % {WN};
  (void)N;
  /* K columns [k0, k0 + {BK}) of the block's rows of x and of the weights into stage s, 16 bytes a copy */
  auto load_tile = [&](int s, int k0) {{
    elem_t *xd = xs + s * {BM * KP}, *wd = ws + s * {NB * BN * KP};
    for (int c = threadIdx.x; c < {BM * BK // 8}; c += {T}) {{
      const int r = c / {BK // 8}, kc = (c % {BK // 8}) * 8, row = m0 + r;
      {copy}(xd + r * {KP} + kc, x + (long)(row < M ? row : M - 1) * K + k0 + kc, row < M);
    }}
    for (int c = threadIdx.x; c < {NB * BN * BK // 8}; c += {T}) {{
      const int r = c / {BK // 8}, kc = (c % {BK // 8}) * 8;
      {copy}(wd + r * {KP} + kc, {w_row} + k0 + kc, true);
    }}
  }};
  float acc[{NB}][{TM}][{TN}][4];
  #pragma unroll
  for (int b = 0; b < {NB}; ++b)
    #pragma unroll
    for (int i = 0; i < {TM}; ++i)
      #pragma unroll
      for (int j = 0; j < {TN}; ++j)
        #pragma unroll
        for (int e = 0; e < 4; ++e) acc[b][i][j][e] = 0.0f;
  /* the warp's {TM}x{TN} fragments of one stage: two k-steps of 16 */
  auto mma_tile = [&](int s) {{
    const elem_t *xa = xs + s * {BM * KP}, *wt = ws + s * {NB * BN * KP};
    #pragma unroll
    for (int kk = 0; kk < {BK}; kk += 16) {{
      unsigned a[{TM}][4], bf[{NB}][{TN}][2];
{fragments}      #pragma unroll
      for (int b = 0; b < {NB}; ++b)
        #pragma unroll
        for (int i = 0; i < {TM}; ++i)
          #pragma unroll
          for (int j = 0; j < {TN}; ++j) mma_bf16_16816(acc[b][i][j], a[i], bf[b][j]);
    }}
  }};
{main_loop}
  #pragma unroll
  for (int i = 0; i < {TM}; ++i)
    #pragma unroll
    for (int j = 0; j < {TN}; ++j)
      #pragma unroll
      for (int h = 0; h < 2; ++h) {{
        const int row = m0 + wm * {TM * 16} + i * 16 + g + h * 8, col = n0 + wn * {TN * 8} + j * 8 + t * 2;
        if (row < M) {{
          #pragma unroll
          for (int e = 0; e < 2; ++e) store_out(out + (long)row * N + col + e, {value});
        }}
      }}
}}
"""
    return code, smem_bytes(k, NB), (N // BN, -(-M // BM))


def _paired_fragments(BN: int, KP: int, TM: int, TN: int, NB: int) -> str:
    """Fragments read from shared memory a bf16 pair (32 bits) at a time, in the layout the mma expects."""
    return f"""      #pragma unroll
      for (int i = 0; i < {TM}; ++i) {{
        const elem_t *p = xa + (wm * {TM * 16} + i * 16 + g) * {KP} + kk + t * 2;
        a[i][0] = ld_pair(p); a[i][1] = ld_pair(p + {8 * KP}); a[i][2] = ld_pair(p + 8); a[i][3] = ld_pair(p + {8 * KP + 8});
      }}
      #pragma unroll
      for (int b = 0; b < {NB}; ++b)
        #pragma unroll
        for (int j = 0; j < {TN}; ++j) {{
          const elem_t *p = wt + (b * {BN} + wn * {TN * 8} + j * 8 + g) * {KP} + kk + t * 2;
          bf[b][j][0] = ld_pair(p); bf[b][j][1] = ld_pair(p + 8);
        }}
"""


def _ldmatrix_fragments(BN: int, KP: int, TM: int, TN: int, NB: int) -> str:
    """Fragments read with ldmatrix: one instruction per A fragment (matrices: rows 0-7 / 8-15 x k 0-7 / 8-15)
    and per two B fragments (n block j and j + 1 x k 0-7 / 8-15; x2 for a last odd one)."""
    pairs = TN // 2
    odd = f"""          ldmatrix_x2(bf[b][{TN - 1}], wt + (b * {BN} + wn * {TN * 8} + {(TN - 1) * 8} + (lane & 7)) * {KP} + kk + ((lane >> 3) & 1) * 8);
""" if TN % 2 else ""
    return f"""      #pragma unroll
      for (int i = 0; i < {TM}; ++i)
        ldmatrix_x4(a[i], xa + (wm * {TM * 16} + i * 16 + (lane & 15)) * {KP} + kk + (lane >> 4) * 8);
      #pragma unroll
      for (int b = 0; b < {NB}; ++b) {{
        #pragma unroll
        for (int j = 0; j < {2 * pairs}; j += 2) {{
          unsigned r[4];
          ldmatrix_x4(r, wt + (b * {BN} + wn * {TN * 8} + j * 8 + (lane & 7) + (lane >> 4) * 8) * {KP} + kk + ((lane >> 3) & 1) * 8);
          bf[b][j][0] = r[0]; bf[b][j][1] = r[1]; bf[b][j + 1][0] = r[2]; bf[b][j + 1][1] = r[3];
        }}
{odd}      }}
"""
