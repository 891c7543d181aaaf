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


# ---------------------------------------------------------------- causal GQA prefill attention

KEY_TILE = 32  # keys per shared-memory tile: four 8-key score fragments, two 16-key P.V steps


def attention_legal(head_dim: int, seq_len: int, k: dict[str, Any]) -> bool:
    """Clamp `warps` (16 query rows each) to the sequence; False if the head dimension rules tensor cores out."""
    if head_dim % 16 or head_dim > 256:
        return False
    k["warps"] = min(k["warps"], 8)
    while k["warps"] > 1 and k["warps"] * 16 >= 2 * (-(-seq_len // 16) * 16):
        k["warps"] //= 2
    return True


def attention_kernel(B: int, HQ: int, HK: int, S: int, D: int, scale: float, k: dict[str, Any]) -> tuple[str, tuple, int]:
    """Flash-attention-2 style causal prefill on tensor cores: each warp owns 16 query rows of one head; a
    block's warps share K/V tiles of 32 keys in shared memory; S = Q.K^T and O += P.V are mma.sync fragments,
    the online softmax runs on the score fragments (the 4 lanes holding a row reduce with shuffles), and P is
    re-packed from the score layout into the A-operand layout in registers (bf16, as flash attention does).
    Q, K, V, out are [batch, heads, S, D]."""
    W = k["warps"]
    T, QT, KP = W * 32, W * 16, D + PAD
    G = HQ // HK
    DS, DN = D // 16, D // 8  # 16-wide k-steps over D for Q.K^T; 8-wide output fragments of P.V
    code = f"""
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {{
  return (unsigned)from_f32(lo) | ((unsigned)from_f32(hi) << 16);
}}
extern "C" __global__ void __launch_bounds__({T}) attention_mma(const elem_t *__restrict__ q, const elem_t *__restrict__ kc,
    const elem_t *__restrict__ vc, elem_t *__restrict__ out) {{
  const int S = {S}, D = {D};
  __shared__ __align__(16) elem_t ks[{KEY_TILE * KP}], vs[{KEY_TILE * KP}];
  const long bh = blockIdx.x, b = bh / {HQ}, hk = (bh % {HQ}) / {G};
  const elem_t *qb = q + bh * S * D, *kb = kc + (b * {HK} + hk) * S * D, *vb = vc + (b * {HK} + hk) * S * D;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int q0 = blockIdx.y * {QT} + warp * 16;  /* this warp's rows q0 .. q0 + 15 */
  const int r0 = min(q0 + g, S - 1), r1 = min(q0 + g + 8, S - 1);  /* rows past S compute on row S - 1, never stored */
  unsigned qa[{DS}][4];
  #pragma unroll
  for (int s = 0; s < {DS}; ++s) {{
    qa[s][0] = ld_pair(qb + (long)r0 * D + s * 16 + 2 * t); qa[s][1] = ld_pair(qb + (long)r1 * D + s * 16 + 2 * t);
    qa[s][2] = ld_pair(qb + (long)r0 * D + s * 16 + 2 * t + 8); qa[s][3] = ld_pair(qb + (long)r1 * D + s * 16 + 2 * t + 8);
  }}
  float o[{DN}][4], m[2] = {{-INFINITY, -INFINITY}}, l[2] = {{0.0f, 0.0f}};
  #pragma unroll
  for (int n = 0; n < {DN}; ++n)
    #pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
  const int block_last = min(S, (int)(blockIdx.y + 1) * {QT}) - 1;  /* causal: no key past the block's last row */
  for (int k0 = 0; k0 <= block_last; k0 += {KEY_TILE}) {{
    __syncthreads();  /* everyone is done with the previous tile */
    for (int c = threadIdx.x; c < {KEY_TILE * D // 8}; c += {T}) {{
      const int r = c / {D // 8}, d = (c % {D // 8}) * 8;
      const bool in = k0 + r < S;
      const long at = (long)(in ? k0 + r : 0) * D + d;
      copy16(ks + r * {KP} + d, kb + at, in);
      copy16(vs + r * {KP} + d, vb + at, in);
    }}
    __syncthreads();
    float sc[4][4];  /* scores of 4 fragments of 8 keys: [key block][row g: 0, 1 | row g + 8: 2, 3] */
    #pragma unroll
    for (int n = 0; n < 4; ++n) {{
      #pragma unroll
      for (int e = 0; e < 4; ++e) sc[n][e] = 0.0f;
      #pragma unroll
      for (int s = 0; s < {DS}; ++s) {{
        const unsigned kf[2] = {{ld_pair(ks + (n * 8 + g) * {KP} + s * 16 + 2 * t), ld_pair(ks + (n * 8 + g) * {KP} + s * 16 + 2 * t + 8)}};
        mma_bf16_16816(sc[n], qa[s], kf);
      }}
    }}
    float mx[2] = {{-INFINITY, -INFINITY}};
    #pragma unroll
    for (int n = 0; n < 4; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {{
        const int key = k0 + n * 8 + 2 * t + (e & 1), row = q0 + g + (e >> 1) * 8;
        sc[n][e] = key <= row && key < S ? sc[n][e] * {scale!r}f : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], sc[n][e]);
      }}
    float corr[2];
    #pragma unroll
    for (int h = 0; h < 2; ++h) {{
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));  /* the row's max over its 4 lanes */
      const float mn = fmaxf(m[h], mx[h]);
      corr[h] = mn == -INFINITY ? 1.0f : __expf(m[h] - mn);
      m[h] = mn;
      l[h] *= corr[h];
    }}
    #pragma unroll
    for (int n = 0; n < 4; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {{
        sc[n][e] = m[e >> 1] == -INFINITY ? 0.0f : __expf(sc[n][e] - m[e >> 1]);
        l[e >> 1] += sc[n][e];  /* this lane's part of the row sum; the 4 lanes are added at the end */
      }}
    #pragma unroll
    for (int n = 0; n < {DN}; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] *= corr[e >> 1];
    #pragma unroll
    for (int c = 0; c < 2; ++c) {{  /* 16 keys at a time: score fragments 2c and 2c + 1 are P's A operand */
      const unsigned pa[4] = {{pack_bf16(sc[2 * c][0], sc[2 * c][1]), pack_bf16(sc[2 * c][2], sc[2 * c][3]),
                               pack_bf16(sc[2 * c + 1][0], sc[2 * c + 1][1]), pack_bf16(sc[2 * c + 1][2], sc[2 * c + 1][3])}};
      const elem_t *v0 = vs + (c * 16 + 2 * t) * {KP} + g;
      #pragma unroll
      for (int n = 0; n < {DN}; ++n) {{
        const elem_t *v = v0 + n * 8;  /* B[key][d] = V[key][d]: a column of the tile, two keys per register */
        const unsigned vf[2] = {{(unsigned)v[0] | ((unsigned)v[{KP}] << 16), (unsigned)v[{8 * KP}] | ((unsigned)v[{9 * KP}] << 16)}};
        mma_bf16_16816(o[n], pa, vf);
      }}
    }}
  }}
  #pragma unroll
  for (int h = 0; h < 2; ++h) {{
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }}
  #pragma unroll
  for (int h = 0; h < 2; ++h) {{
    const int row = q0 + g + h * 8;
    if (row >= S) continue;
    #pragma unroll
    for (int n = 0; n < {DN}; ++n)
      #pragma unroll
      for (int e = 0; e < 2; ++e) out[(bh * S + row) * D + n * 8 + 2 * t + e] = from_f32(o[n][h * 2 + e] / l[h]);
  }}
}}
"""
    return code, (B * HQ, -(-S // QT)), T
