"""The CPU target: C + OpenMP + x86 SIMD intrinsics, compiled with the system C compiler."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.targets.cpu import codegen
from autocomp_compile.targets.cpu.compiler import compiler, compiler_version
from autocomp_compile.targets.cpu.evaluator import CpuEvaluator
from autocomp_compile.targets.cpu.isa import cpu_model, supported_isas
from autocomp_compile.paths import build_dir
from autocomp_compile.targets.base import ScheduleSpaceTarget
from autocomp_compile.workload import Workload


def default_build_dir() -> Path:
    return build_dir("cpu")


class CpuTarget(ScheduleSpaceTarget):
    name = "cpu"
    language = "c"
    codegen = codegen
    naive_plan = "Naive translation of the PyTorch reference: scalar loops, one thread."
    # Flops per byte moved from which a workload is bound by arithmetic here: above the ridge point of the hosts
    # measured (an AVX2 EPYC: 178 GFLOP/s over 17-35 GB/s, 5-10; an AVX-512 Xeon about 11). Prefill and batch-32
    # GEMMs (32-64 flops per byte in bf16) are above it, decode GEMVs (about 1) far below.
    compute_bound_intensity = 16.0

    def __init__(self, isas: list[str] | None = None):
        self.isas = isas or supported_isas()

    def available(self) -> tuple[bool, str]:
        if compiler() is None:
            return False, "no C compiler: install gcc (e.g. apt install gcc) or set $CC"
        return True, ""

    def fingerprint(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "cpu": cpu_model(),
            "isa": self.isas[-1],
            "isas": self.isas,
            "cores": os.cpu_count(),
            "compiler": compiler_version(),
            "codegen": codegen.CODEGEN_VERSION,
        }

    def describe(self) -> str:
        return f"{cpu_model()}, {os.cpu_count()} cores, ISA {'/'.join(self.isas)}"

    def legalize(self, workload: Workload, knobs: dict[str, Any]) -> dict[str, Any]:
        return codegen.legalize(workload, knobs, self.isas)

    def schedule_kinds(self, kind: str) -> tuple[str, ...]:
        """The GEMM, the LM head and the MLP share one schedule space (the GEMV family's knobs)."""
        return codegen.GEMV_KINDS if codegen.family(kind) == "gemv" else (kind,)

    def menu(self, workload: Workload):
        from autocomp_compile.agents.menu import cpu_menu

        return cpu_menu(workload, self.isas)

    def make_evaluator(self, workload: Workload, build_dir: Path | None = None, settings: EvalSettings | None = None) -> CpuEvaluator:
        return CpuEvaluator(workload, build_dir or default_build_dir(), settings)
