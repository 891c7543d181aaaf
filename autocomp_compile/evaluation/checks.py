"""Correctness comparison with dtype-aware tolerances, and interleaved timing."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

# (atol relative to the reference's RMS, rtol): bf16 outputs carry 8 mantissa bits.
TOLERANCES = {torch.bfloat16: (1.6e-2, 1.6e-2), torch.float32: (1e-4, 1e-4)}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


@dataclass
class Mismatch:
    ok: bool
    max_abs_error: float
    message: str


def compare(name: str, out: torch.Tensor, ref: torch.Tensor) -> Mismatch:
    """Check `out` (kernel) against `ref` (float32/64 reference): |out-ref| <= atol*rms(ref) + rtol*|ref|."""
    atol_rel, rtol = tolerance(out.dtype)
    o, r = out.double(), ref.double()
    if o.shape != r.shape:
        return Mismatch(False, float("inf"), f"{name}: shape {tuple(o.shape)} != reference {tuple(r.shape)}")
    finite = torch.isfinite(o)
    if not bool(finite.all()):
        idx = tuple(int(i) for i in (~finite).nonzero()[0])
        n_bad = int((~finite).sum())
        return Mismatch(False, float("inf"), f"{name}: {n_bad} non-finite values, first at {idx} (unwritten output?)")
    atol = atol_rel * float(r.pow(2).mean().sqrt())
    err = (o - r).abs()
    allowed = atol + rtol * r.abs()
    worst = int((err - allowed).argmax())
    max_err = float(err.max())
    if bool((err <= allowed).all()):
        return Mismatch(True, max_err, "")
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), o.shape))
    return Mismatch(
        False,
        max_err,
        f"{name}: at {idx} got {float(o.flatten()[worst]):.6g}, expected {float(r.flatten()[worst]):.6g} "
        f"(atol={atol:.3g}, rtol={rtol:.3g}); max abs error {max_err:.4g}",
    )


@dataclass
class Timing:
    median_ms: float
    p99_ms: float
    runs: int


def _summary(samples: list[float]) -> Timing:
    t = torch.tensor(samples, dtype=torch.float64) * 1e3
    return Timing(float(t.median()), float(torch.quantile(t, 0.99)), len(samples))


# Spot checks and warm-up lengths are drawn from the OS's randomness, not a seed: a kernel that counts its calls
# cannot know which ones are checked (they change no result of an honest kernel).
_UNPREDICTABLE = random.SystemRandom()
SPOT_CHECKS = 2


def _spot_positions(runs: int, checks: dict[str, Callable[[], None]] | None) -> set[int]:
    """Which timed runs are followed by their function's check (`SPOT_CHECKS` of them, at random)."""
    return set(_UNPREDICTABLE.sample(range(runs), min(SPOT_CHECKS, runs))) if checks else set()


def time_interleaved(
    fns: dict[str, Callable[[], None]], budget_ms: float = 1500.0, min_runs: int = 5, max_runs: int = 200, warmup: int = 2,
    prepare: dict[str, Callable[[], None]] | None = None, checks: dict[str, Callable[[], None]] | None = None,
) -> dict[str, Timing]:
    """Time several functions in alternation (a, b, a, b, ...), so machine noise hits all alike.

    The number of runs comes from a time budget, as in triton's do_bench. `prepare[name]`, where given, runs
    before each call of `fns[name]`, outside the timed region (e.g. writing fresh activations); `checks[name]`
    after a few timed calls of it picked at random, outside the timed region (checking that call's output).
    The warm-up takes 0-2 calls more than `warmup`, at random.
    """
    before = _preparers(fns, prepare)
    warmup += _UNPREDICTABLE.randrange(3)
    for name, fn in fns.items():
        for _ in range(warmup):
            before[name]()
            fn()
    start = time.perf_counter()
    for name, fn in fns.items():
        before[name]()
        fn()
    estimate_ms = (time.perf_counter() - start) * 1e3
    runs = int(min(max_runs, max(min_runs, budget_ms / max(estimate_ms, 1e-3))))
    spot = _spot_positions(runs, checks)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(runs):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            before[name]()
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
            if i in spot and name in checks:
                checks[name]()
    return {name: _summary(s) for name, s in samples.items()}


def _nothing() -> None:
    pass


def _preparers(fns: dict[str, Callable[[], None]], prepare: dict[str, Callable[[], None]] | None
               ) -> dict[str, Callable[[], None]]:
    """The function to run before each call of every timed function (one that does nothing where none is given)."""
    unknown = set(prepare or {}) - set(fns)
    if unknown:
        raise ValueError(f"prepare names functions that are not timed: {sorted(unknown)}")
    return {name: (prepare or {}).get(name, _nothing) for name in fns}


def time_interleaved_cuda(
    fns: dict[str, Callable[[], None]], budget_ms: float = 1000.0, min_runs: int = 10, max_runs: int = 500, warmup: int = 3,
    flush: str = "read", prepare: dict[str, Callable[[], None]] | None = None,
    checks: dict[str, Callable[[], None]] | None = None,
) -> dict[str, Timing]:
    """As `time_interleaved`, on the GPU: CUDA events around each call, and the L2 cache flushed
    before each one (decode weights would otherwise be served from a 50-60 MB L2).

    The flush reads a buffer twice the L2's size (`flush="read"`), which leaves L2 full of clean lines, as the
    weight-streaming kernels before any kernel of a decode step leave it. `flush="zero"` writes the buffer instead
    (triton's do_bench does): the timed call then also pays for writing back up to an L2 of dirty lines, which
    no decode step has; on an H100 that added 4 us to a 100 MB GEMV (37 -> 41 us) and 10 us to cuBLAS's MLP.

    `prepare[name]`, where given, runs after each call's flush and before its start event: outside the timed
    region, and what it writes (fresh activations) is in L2, as the kernel before it in a decode step leaves them.

    A ~100 us spin kernel is queued before each start event so the host can enqueue the whole call
    while the GPU is busy: the events then time GPU execution, not Python launch gaps (which would
    otherwise inflate multi-op PyTorch baselines and multi-kernel candidates alike).
    """
    if flush not in ("read", "zero"):
        raise ValueError(f"flush must be 'read' or 'zero', got {flush!r}")
    before = _preparers(fns, prepare)
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    buffer = torch.zeros(max(2 * l2, 1 << 20) // 4, dtype=torch.float32, device="cuda")
    sink = torch.zeros((), dtype=torch.float32, device="cuda")
    flush_l2 = (lambda: torch.sum(buffer, out=sink)) if flush == "read" else buffer.zero_
    spin_cycles = 200_000  # ~100 us at the ~2 GHz SM clock of an H100/H200
    warmup += _UNPREDICTABLE.randrange(3)
    for name, fn in fns.items():
        for _ in range(warmup):
            before[name]()
            fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for name, fn in fns.items():
        before[name]()
        fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - t0) * 1e3
    runs = int(min(max_runs, max(min_runs, budget_ms / max(estimate_ms, 1e-3))))
    events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)] for name in fns}
    spot = _spot_positions(runs, checks)
    names = list(fns)
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            flush_l2()
            before[name]()  # after the flush (fresh activations sit in L2, as a previous kernel leaves them), untimed
            torch.cuda._sleep(spin_cycles)
            start, end = events[name][i]
            start.record()
            fns[name]()
            end.record()
            if i in spot and name in checks:
                torch.cuda.synchronize()  # outside the events: the next call's flush and spin precede its start
                checks[name]()
    torch.cuda.synchronize()
    return {name: _summary([s.elapsed_time(e) / 1e3 for s, e in events[name]]) for name in fns}
