"""Measure the GPU's memory bandwidth: a large device-to-device copy (bytes read plus written), and a large
read (a sum: bytes read), the roofline of a kernel that only streams weights in."""
from __future__ import annotations

from typing import Callable


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_hbm_bandwidth(gigabytes: float = 2.0, repeats: int = 20) -> float:
    """Median GB/s of copying a `gigabytes` buffer (read + write counted), with CUDA events."""
    import torch

    n = int(gigabytes * 1e9) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n * 4 / _median_seconds(lambda: dst.copy_(src), repeats) / 1e9


def measure_hbm_read_bandwidth(gigabytes: float = 2.0, repeats: int = 20) -> float:
    """Median GB/s of reading a `gigabytes` buffer (torch.sum into a preallocated scalar), with CUDA events."""
    import torch

    n = int(gigabytes * 1e9) // 4
    src = torch.randn(n, device="cuda")
    sink = torch.zeros((), device="cuda")
    return n * 4 / _median_seconds(lambda: torch.sum(src, out=sink), repeats) / 1e9
