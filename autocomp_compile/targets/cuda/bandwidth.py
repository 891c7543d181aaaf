"""Measure the GPU's memory bandwidth: a large device-to-device copy, bytes read plus written."""
from __future__ import annotations


def measure_hbm_bandwidth(gigabytes: float = 2.0, repeats: int = 20) -> float:
    """Median GB/s of copying a `gigabytes` buffer (read + write counted), with CUDA events."""
    import torch

    n = int(gigabytes * 1e9) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n * 4 / times[len(times) // 2] / 1e9
