"""Measure the host's memory read bandwidth with a compiled streaming-read kernel.

The roofline for decode kernels: they read their weights once, so GB/s read is the figure of merit.
"""
from __future__ import annotations

import ctypes
import statistics
import tempfile
import time
from pathlib import Path

from autocomp_compile.targets.cpu.compiler import build
from autocomp_compile.targets.cpu.isa import best_isa

# Each thread reads STREAMS regions of its share at once: with one stream per core, this 2-core Xeon VM read
# 20 GB/s where the weight-streaming kernels (several rows at once) reached 30; eight streams read 30-32.
STREAMS = 8
_READ_KERNEL = r"""
#include <stdint.h>
#include <immintrin.h>
#define STREAMS @STREAMS@
/* Sum n floats (a multiple of STREAMS * 4096) with all OpenMP threads; the result keeps the loads alive. */
float read_all(const float *p, int64_t n) {
  const int64_t per = n / STREAMS;
  float total = 0.0f;
  #pragma omp parallel for reduction(+:total) schedule(static)
  for (int64_t blk = 0; blk < per / 4096; ++blk) {
#ifdef __AVX2__
    __m256 a[STREAMS];
    for (int s = 0; s < STREAMS; ++s) a[s] = _mm256_setzero_ps();
    for (int64_t i = blk * 4096; i < (blk + 1) * 4096; i += 8)
      for (int s = 0; s < STREAMS; ++s) a[s] = _mm256_add_ps(a[s], _mm256_loadu_ps(p + s * per + i));
    __m256 t = a[0];
    for (int s = 1; s < STREAMS; ++s) t = _mm256_add_ps(t, a[s]);
    float tmp[8];
    _mm256_storeu_ps(tmp, t);
    for (int j = 0; j < 8; ++j) total += tmp[j];
#else
    float a[STREAMS] = {0};
    for (int64_t i = blk * 4096; i < (blk + 1) * 4096; ++i)
      for (int s = 0; s < STREAMS; ++s) a[s] += p[s * per + i];
    for (int s = 0; s < STREAMS; ++s) total += a[s];
#endif
  }
  return total;
}
""".replace("@STREAMS@", str(STREAMS))


class ReadProbe:
    """A compiled streaming read over a buffer far larger than the caches; call it to read it once."""

    def __init__(self, megabytes: int = 512):
        import torch

        isa = "avx2" if best_isa() != "scalar" else "scalar"
        with tempfile.TemporaryDirectory() as tmp:
            result = build(_READ_KERNEL, isa, Path(tmp))
            if not result.ok:
                raise RuntimeError(f"cannot build the bandwidth probe: {result.log}")
            self._lib = ctypes.CDLL(str(result.so_path))
        self._lib.read_all.restype = ctypes.c_float
        self._lib.read_all.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self.n = megabytes * (1 << 20) // 4 // (STREAMS * 4096) * (STREAMS * 4096)
        self.buf = torch.randn(self.n)
        self.nbytes = self.n * 4
        self()

    def __call__(self) -> None:
        self._lib.read_all(self.buf.data_ptr(), self.n)


def measure_read_bandwidth(megabytes: int = 1024, repeats: int = 9) -> float:
    """Median read bandwidth in GB/s over `repeats` passes (the median, like the kernel timings)."""
    probe = ReadProbe(megabytes)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        probe()
        times.append(time.perf_counter() - start)
    return probe.nbytes / statistics.median(times) / 1e9
