"""Host vector-ISA detection and the C vocabulary each ISA gives generated kernels.

Kernels are written once against a small set of inline functions (`v_zero`, `v_fma`, `v_dot`,
`v_load_elem`, `v_hsum`, ...); the ISA chosen by the schedule decides what they compile to.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path

# Ordered from least to most capable; a schedule may use any ISA the host supports.
# "amx": AVX512-BF16 plus the AMX tile unit (bf16 tile matrix products), used by causal prefill attention.
ISA_ORDER = ("scalar", "avx2", "avx512", "avx512bf16", "amx")
ISA_FLAGS = {
    "scalar": set(),
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl"},
    "avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
    "amx": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"},
}
# Compiler flags that enable an ISA even when the host lacks it (for compile-only tests).
ISA_CFLAGS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl"],
    "avx512bf16": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
    "amx": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
}
VECTOR_WIDTH = {"scalar": 1, "avx2": 8, "avx512": 16, "avx512bf16": 16, "amx": 16}
VECTOR_REGISTERS = {"scalar": 0, "avx2": 16, "avx512": 32, "avx512bf16": 32, "amx": 32}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes(default: int = 64 << 20) -> int:
    """The largest CPU cache's size (sysfs), or `default` where the system does not say."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (entry / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=default)


@functools.lru_cache(maxsize=1)
def amx_permitted() -> bool:
    """Ask Linux for this process's AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): a
    process that has not asked faults on its first tile instruction. Kernels make no system calls (linkage.py),
    so the process loading them asks, once; the grant covers all its threads."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    except (OSError, AttributeError):
        return False


def supported_isas(flags: frozenset[str] | None = None) -> list[str]:
    """ISAs this host can run, scalar first. Non-x86 hosts get scalar only; AMX only where Linux grants the
    tile state (asked here, for this process)."""
    host = flags is None
    flags = cpu_flags() if flags is None else flags
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["scalar"]
    return [isa for isa in ISA_ORDER if ISA_FLAGS[isa] <= flags and (isa != "amx" or not host or amx_permitted())]


def best_isa(flags: frozenset[str] | None = None) -> str:
    return supported_isas(flags)[-1]


_COMMON = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float bf16_to_f32(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
  return (uint16_t)(u >> 16);
}
"""

_ELEM = {
    "bf16": "typedef uint16_t elem_t;\n"
    "static inline float elem_to_f32(elem_t v) { return bf16_to_f32(v); }\n"
    "static inline elem_t f32_to_elem(float f) { return f32_to_bf16(f); }\n",
    "fp32": "typedef float elem_t;\n"
    "static inline float elem_to_f32(elem_t v) { return v; }\n"
    "static inline elem_t f32_to_elem(float f) { return f; }\n",
}

_SCALAR = r"""
#define VW 1
typedef float vf;
static inline vf v_zero(void) { return 0.0f; }
static inline vf v_set1(float a) { return a; }
static inline vf v_fma(vf a, vf b, vf c) { return a * b + c; }
static inline vf v_mul(vf a, vf b) { return a * b; }
static inline vf v_add(vf a, vf b) { return a + b; }
static inline vf v_max(vf a, vf b) { return a > b ? a : b; }
static inline vf v_load_f32(const float *p) { return *p; }
static inline void v_store_f32(float *p, vf v) { *p = v; }
static inline vf v_load_elem(const elem_t *p) { return elem_to_f32(*p); }
static inline float v_hsum(vf v) { return v; }
static inline float v_hmax(vf v) { return v; }
"""

_AVX2 = r"""
#include <immintrin.h>
#define VW 8
typedef __m256 vf;
static inline vf v_zero(void) { return _mm256_setzero_ps(); }
static inline vf v_set1(float a) { return _mm256_set1_ps(a); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf v_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf v_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf v_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf v_load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store_f32(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline float v_hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}
static inline float v_hmax(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s)); s = _mm_max_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s);
}
"""
_AVX2_LOAD = {
    "bf16": "static inline vf v_load_elem(const elem_t *p) {\n"
    "  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));\n}\n",
    "fp32": "static inline vf v_load_elem(const elem_t *p) { return _mm256_loadu_ps(p); }\n",
}

_AVX512 = r"""
#include <immintrin.h>
#define VW 16
typedef __m512 vf;
static inline vf v_zero(void) { return _mm512_setzero_ps(); }
static inline vf v_set1(float a) { return _mm512_set1_ps(a); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf v_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf v_load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store_f32(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline float v_hsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline float v_hmax(vf v) { return _mm512_reduce_max_ps(v); }
"""
_AVX512_LOAD = {
    "bf16": "static inline vf v_load_elem(const elem_t *p) {\n"
    "  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));\n}\n",
    "fp32": "static inline vf v_load_elem(const elem_t *p) { return _mm512_loadu_ps(p); }\n",
}

# exp over a vector, for softmaxes (included by kernels that use it): exp(x) = 2^n e^r with n = round(x log2 e),
# r = x - n ln 2 in two steps (Cody-Waite: ln 2 split in a high part exact in float and a low part), and e^r
# (|r| <= ln2/2) from its degree-7 Taylor polynomial: relative error ~1e-7. Far below the softmax range (and at
# -inf, a masked score) the result is 0, above float's range +inf, as from expf; NaN stays NaN.
_EXP_POLY = r"""
static inline vf v_exp_reduced(vf x, vf n) {
  const vf r = v_fma(n, v_set1(-1.42860677e-6f), v_fma(n, v_set1(-0.693145752f), x));
  vf p = v_set1(1.98412698e-4f);
  p = v_fma(p, r, v_set1(1.38888889e-3f)); p = v_fma(p, r, v_set1(8.33333333e-3f));
  p = v_fma(p, r, v_set1(4.16666667e-2f)); p = v_fma(p, r, v_set1(1.66666667e-1f));
  p = v_fma(p, r, v_set1(0.5f)); p = v_fma(p, r, v_set1(1.0f)); return v_fma(p, r, v_set1(1.0f));
}
"""
VECTOR_EXP = {
    "scalar": "static inline vf v_exp(vf x) { return expf(x); }\n",
    "avx2": _EXP_POLY + r"""static inline vf v_exp(vf x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLT_UQ);  /* NaN stays NaN */
  const __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.72f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = v_exp_reduced(x, n);
  const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return _mm256_blendv_ps(_mm256_and_ps(_mm256_castsi256_ps(bits), live), _mm256_set1_ps(INFINITY), over);
}
""",
    "avx512": _EXP_POLY + r"""static inline vf v_exp(vf x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  /* NaN stays NaN */
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(v_exp_reduced(x, n), n);
}
""",
}
VECTOR_EXP["avx512bf16"] = VECTOR_EXP["amx"] = VECTOR_EXP["avx512"]


# The dot-product step of GEMV-like kernels: VK elements of a weight row times the activation. `w_load` loads (and
# widens) VK weights, `w_dot` multiplies them with the activation and adds; a register tile calls `w_load` once for
# several activation rows, and `v_dot` (defined after each of these) does both for one.
# With AVX512-BF16 the activation is kept in bf16 and vdpbf16ps does 32 products per step.
_DOT_FMA = r"""
#define VK VW
typedef float xval_t;
static inline xval_t x_from_f32(float f) { return f; }
static inline float xval_to_f32(xval_t v) { return v; }
static inline int64_t x_pos(int64_t k, int64_t K) { (void)K; return k; }
typedef vf wv_t;
static inline wv_t w_load(const elem_t *w) { return v_load_elem(w); }
static inline vf w_dot(vf acc, wv_t wv, const xval_t *x) { return v_fma(wv, v_load_f32(x), acc); }
"""


def _dot_split(bits: int) -> str:
    """bf16 even/odd split for `bits`-bit vectors: one full-width load holds 2*VW bf16 weights; a shift gives the even
    ones as fp32, a mask the odd ones. The activation is stored de-interleaved to match (see x_pos)."""
    vw = bits // 32
    load = "_mm256_loadu_si256((const __m256i *)w)" if bits == 256 else "_mm512_loadu_si512((const void *)w)"
    return rf"""
#define VK {2 * vw}
typedef float xval_t;
static inline xval_t x_from_f32(float f) {{ return f; }}
static inline float xval_to_f32(xval_t v) {{ return v; }}
static inline int64_t x_pos(int64_t k, int64_t K) {{
  if (k >= K / VK * VK) return k;
  const int64_t j = k % VK; return k - j + (j & 1) * (VK / 2) + j / 2;
}}
typedef struct {{ __m{bits} even, odd; }} wv_t;
static inline wv_t w_load(const elem_t *w) {{
  const __m{bits}i raw = {load};
  const wv_t v = {{_mm{bits}_castsi{bits}_ps(_mm{bits}_slli_epi32(raw, 16)),
                  _mm{bits}_castsi{bits}_ps(_mm{bits}_and_si{bits}(raw, _mm{bits}_set1_epi32((int)0xffff0000u)))}};
  return v;
}}
static inline vf w_dot(vf acc, wv_t wv, const xval_t *x) {{
  return _mm{bits}_fmadd_ps(wv.odd, _mm{bits}_loadu_ps(x + {vw}), _mm{bits}_fmadd_ps(wv.even, _mm{bits}_loadu_ps(x), acc));
}}
"""


_DOT_BF16 = r"""
#define VK 32
typedef uint16_t xval_t;
static inline xval_t x_from_f32(float f) { return f32_to_bf16(f); }
static inline float xval_to_f32(xval_t v) { return bf16_to_f32(v); }
static inline int64_t x_pos(int64_t k, int64_t K) { (void)K; return k; }
typedef __m512bh wv_t;
static inline wv_t w_load(const elem_t *w) { return (__m512bh)_mm512_loadu_si512((const void *)w); }
static inline vf w_dot(vf acc, wv_t wv, const xval_t *x) {
  return _mm512_dpbf16_ps(acc, wv, (__m512bh)_mm512_loadu_si512((const void *)x));
}
"""
_V_DOT = "static inline vf v_dot(vf acc, const elem_t *w, const xval_t *x) { return w_dot(acc, w_load(w), x); }\n"


def prelude(isa: str, dtype: str, bf16_split: bool = False) -> str:
    """C definitions every generated kernel starts with, for one ISA and element type.

    `bf16_split` selects the even/odd-split dot product (bf16 weights, AVX2 or AVX-512 only).
    """
    if isa not in ISA_ORDER:
        raise ValueError(f"unknown ISA {isa!r}; choose one of {ISA_ORDER}")
    if isa in ("avx512bf16", "amx") and dtype != "bf16":
        raise ValueError(f"the {isa} products need bf16 operands")
    parts = [_COMMON, _ELEM[dtype]]
    if isa == "scalar":
        parts.append(_SCALAR)
    elif isa == "avx2":
        parts += [_AVX2, _AVX2_LOAD[dtype]]
    else:
        parts += [_AVX512, _AVX512_LOAD[dtype]]
    if isa in ("avx512bf16", "amx"):
        parts.append(_DOT_BF16)
    elif bf16_split and dtype == "bf16" and isa in ("avx2", "avx512"):
        parts.append(_dot_split(256 if isa == "avx2" else 512))
    else:
        parts.append(_DOT_FMA)
    return "".join(parts) + _V_DOT
