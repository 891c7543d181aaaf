"""CPU evaluator: gcc builds in parallel, then checks and timing in an isolated worker process."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from autocomp_compile.evaluation.evaluator import Built, RoundEvaluator
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.cpu.compiler import build

LOADER = "autocomp_compile.targets.cpu.runtime:CpuKernel"


def _isa_of(c: Candidate) -> str:
    return (c.knobs or {}).get("isa", "avx2" if "immintrin" in c.code else "scalar")


class CpuEvaluator(RoundEvaluator):
    restart_after = ("harness_modified",)  # a thread count, timer or open parallel region it left behind

    def build(self, candidate: Candidate) -> Built:
        b = build(candidate.code, _isa_of(candidate), self.build_dir)
        return Built(b.ok, b.so_path, b.seconds, b.log)

    def loader(self, candidate: Candidate, artifact: Path) -> tuple[str, tuple[Any, ...]]:
        return LOADER, (str(artifact), len(self.workload.tensors))
