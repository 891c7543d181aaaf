"""A documented trn1 (NeuronCore-v2) cost model: turns the emulator's instruction trace into a SIMULATED latency.

Every number here is an estimate, never a measurement; results carry `simulated: True` everywhere.

Sources and assumptions
-----------------------
- Trainium/Inferentia2 Architecture Guide for NKI (awsdocs-neuron, nki/arch/trainium_inferentia2_arch):
  a trn1 device has 2 NeuronCores-v2, HBM of 820 GB/s per chip (shared by both cores: 410 GB/s per core here),
  32 DMA engines (16 per core), SBUF 24 MiB (192 KiB x 128 partitions), PSUM 2 MiB (16 KiB x 128: 8 banks of
  2 KiB), a 128x128 systolic Tensor Engine, Vector / Scalar / GpSimd engines working on 128 partitions in
  parallel.
- Engine clock: 1.4 GHz for every engine (assumption, the NeuronCore-v2 figure quoted in that guide for TensorE).
- Tensor Engine (matmul, transpose): `64 + N` cycles per instruction, N = moving free size (one moving
  column enters the array per cycle; 64 cycles of issue/drain overhead); fp32 operands run at 1/4 rate.
- Vector / Scalar Engine: `64 + F` cycles, F = free elements per partition (one element per lane per cycle,
  all partitions in parallel; 64 cycles fixed instruction overhead). So a [1, 2048] tile costs as much as a
  [128, 2048] one: using partitions is free parallelism.
- GpSimd: `64 + 2 F` cycles (general-purpose cores, half the Vector Engine's elementwise rate; assumption).
- DMA: the queues of a core share its HBM bandwidth; a transfer occupies it for `bytes / (410 GB/s x eff)`,
  eff = min(1, contiguous bytes per descriptor / 512) (descriptors under 512 B waste bandwidth), and completes
  2 us after that (fixed DMA latency, overlappable with other work).

Scheduling: compute instructions issue in program order per engine; DMAs are spread over the core's 16 queues,
so a transfer starts as soon as its inputs are ready and the shared bandwidth has a free slot (a load never
waits behind an unrelated store). An instruction starts when its engine (or bandwidth slot) is free,
the tiles it reads are written (RAW), and the tiles it writes are no longer being read or written (WAR/WAW).
Iterations of `nl.sequential_range` wait for everything before them; `nl.affine_range` iterations overlap
as far as these dependencies allow (fresh tiles per iteration are what lets DMA run ahead of compute).
The latency is the time the last instruction completes.
"""
from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from autocomp_compile.targets.nki.emulator import Op

CLOCK_HZ = 1.4e9
HBM_GBPS_PER_CHIP = 820.0
CORES_PER_CHIP = 2
HBM_BYTES_PER_S = HBM_GBPS_PER_CHIP * 1e9 / CORES_PER_CHIP
DMA_LATENCY_S = 2.0e-6
DMA_EFFICIENT_CHUNK = 512
INSTR_OVERHEAD_CYCLES = 64
FP32_MATMUL_SLOWDOWN = 4
GPSIMD_CYCLES_PER_ELEMENT = 2
MODEL_NAME = "trn1-model-v1"


def op_seconds(op: Op) -> tuple[float, float]:
    """(occupancy of the op's engine, extra latency until its result is usable), in seconds."""
    if op.engine == "dma":
        eff = min(1.0, op.chunk_bytes / DMA_EFFICIENT_CHUNK) if op.chunk_bytes else 1.0
        return op.bytes / (HBM_BYTES_PER_S * eff), DMA_LATENCY_S
    if op.engine == "tensor":
        cycles = INSTR_OVERHEAD_CYCLES + op.free * (FP32_MATMUL_SLOWDOWN if op.fp32 else 1)
    elif op.engine == "gpsimd":
        cycles = INSTR_OVERHEAD_CYCLES + GPSIMD_CYCLES_PER_ELEMENT * op.free
    else:
        cycles = INSTR_OVERHEAD_CYCLES + op.free
    return cycles / CLOCK_HZ, 0.0


@dataclass
class Estimate:
    """A simulated latency and what it is made of."""

    latency_us: float
    busy_us: dict[str, float]
    instructions: dict[str, int]
    dma_bytes: int
    simulated: bool = True
    model: str = MODEL_NAME
    bottleneck: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"latency_us": self.latency_us, "busy_us": self.busy_us, "instructions": self.instructions,
                "dma_bytes": self.dma_bytes, "simulated": True, "model": self.model, "bottleneck": self.bottleneck}


class _Bandwidth:
    """Busy intervals of the shared DMA bandwidth; a transfer takes the first free slot after it is ready."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def place(self, ready: float, length: float) -> float:
        i = bisect.bisect_right(self.ends, ready)
        t = ready
        while i < len(self.starts) and self.starts[i] < t + length:
            t = max(t, self.ends[i])
            i += 1
        self.starts.insert(i, t)
        self.ends.insert(i, t + length)
        return t


def estimate(ops: list[Op]) -> Estimate:
    """Schedule the trace `ops` on one trn1 NeuronCore and return the simulated latency."""
    engine_free: dict[str, float] = defaultdict(float)
    ready: dict[int, float] = defaultdict(float)  # buffer -> when its last write completes
    last_read: dict[int, float] = defaultdict(float)  # buffer -> when its last reader finishes
    busy: dict[str, float] = defaultdict(float)
    floor, end, epoch = 0.0, 0.0, 0
    bandwidth = _Bandwidth()
    for op in ops:
        if op.barrier != epoch:
            epoch, floor = op.barrier, end
        occ, lat = op_seconds(op)
        start = max(floor, *(ready[b] for b in op.reads), *(ready[b] for b in op.writes),
                    *(last_read[b] for b in op.writes))
        if op.engine == "dma":
            start = bandwidth.place(start, occ)
        else:
            start = max(start, engine_free[op.engine])
        finish = start + occ
        done = finish + lat
        engine_free[op.engine] = max(engine_free[op.engine], finish)
        busy[op.engine] += occ
        for b in op.reads:
            last_read[b] = max(last_read[b], done)
        for b in op.writes:
            ready[b] = done
        end = max(end, done)
    busy_us = {e: t * 1e6 for e, t in sorted(busy.items())}
    return Estimate(
        latency_us=end * 1e6, busy_us=busy_us, instructions=dict(Counter(op.engine for op in ops)),
        dma_bytes=sum(op.bytes for op in ops if op.engine == "dma"),
        bottleneck=max(busy_us, key=busy_us.get) if busy_us else "",
    )
