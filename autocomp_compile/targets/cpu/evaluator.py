"""CPU evaluator: compile a round's candidates in parallel, then check and time them one by one in
an isolated worker process (a crash or hang fails that candidate only)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.evaluation.worker import IsolatedWorker, WorkerCrash, WorkerTimeout
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import EvalResult
from autocomp_compile.targets.cpu.compiler import BuildResult, build
from autocomp_compile.workload import Workload

_JOB = "autocomp_compile.evaluation.job:check_and_time"
LOADER = "autocomp_compile.targets.cpu.runtime:CpuKernel"


def _isa_of(c: Candidate) -> str:
    return (c.knobs or {}).get("isa", "avx2" if "immintrin" in c.code else "scalar")


class CpuEvaluator:
    """Evaluates candidates for one workload; owns a worker process until `close()`."""

    def __init__(self, workload: Workload, build_dir: Path, settings: EvalSettings | None = None, build_workers: int | None = None):
        self.workload = workload
        self.build_dir = build_dir
        self.settings = settings or EvalSettings()
        self.build_workers = build_workers or os.cpu_count() or 1
        self._worker = IsolatedWorker()

    def build_all(self, candidates: list[Candidate]) -> list[BuildResult]:
        with ThreadPoolExecutor(self.build_workers) as pool:  # gcc runs as a subprocess: threads suffice
            return list(pool.map(lambda c: build(c.code, _isa_of(c), self.build_dir), candidates))

    def evaluate(self, candidates: list[Candidate]) -> list[EvalResult]:
        """All builds first, then timing: nothing compiles while a kernel is being timed."""
        builds = self.build_all(candidates)
        results = []
        for i, (cand, b) in enumerate(zip(candidates, builds)):
            if not b.ok:
                results.append(EvalResult.failure("compile", "compilation failed", stderr=b.log, compile_s=b.seconds))
                continue
            settings = EvalSettings(**{**self.settings.__dict__, "seed": self.settings.seed * 1_000_003 + int(cand.code_hash[:8], 16)})
            try:
                out = self._worker.run(
                    _JOB, self.workload, LOADER, (str(b.so_path), len(self.workload.tensors)), settings,
                    timeout_s=self.settings.timeout_s,
                )
                res = EvalResult(**out)
            except WorkerTimeout as exc:
                res = EvalResult.failure("timeout", str(exc))
            except WorkerCrash as exc:
                res = EvalResult.failure("crash", str(exc))
            except RuntimeError as exc:
                res = EvalResult.failure("crash", "evaluation raised an exception", stderr=str(exc)[-4000:])
            res.compile_s = b.seconds
            results.append(res)
        return results

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> "CpuEvaluator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
