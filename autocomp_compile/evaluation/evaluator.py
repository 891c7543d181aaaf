"""The round evaluator every target shares: build all candidates in parallel, then check and time
them one by one in an isolated worker process (a crash or hang fails that candidate only)."""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.evaluation.worker import (IsolatedWorker, WorkerCrash, WorkerTimeout, acquire_worker,
                                               release_worker)
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import EvalResult, RunOffError
from autocomp_compile.workload import Workload

_JOB = "autocomp_compile.evaluation.job:check_and_time"
_RUN_OFF = "autocomp_compile.evaluation.job:run_off"


@dataclass
class Built:
    ok: bool
    artifact: Path | None
    seconds: float
    log: str


class RoundEvaluator:
    """Subclasses say how to build a candidate and how the worker loads the result."""

    # Stages after which the worker process is replaced (its state may be corrupt, e.g. a CUDA context).
    restart_after: tuple[str, ...] = ()
    # The `module:function` the worker runs per candidate (a target may check and time in its own way).
    job: str = _JOB
    # The job that times finalists against each other (`run_off`), or None where a candidate's measurement does
    # not depend on when it was taken (a cost model's estimate): a target that times in its own way sets its own.
    run_off_job: str | None = _RUN_OFF

    def __init__(self, workload: Workload, build_dir: Path, settings: EvalSettings | None = None, build_workers: int | None = None):
        self.workload = workload
        self.build_dir = build_dir
        self.settings = settings or EvalSettings()
        self.build_workers = build_workers or int(os.environ.get("AUTOCOMP_BUILD_WORKERS", 0)) or os.cpu_count() or 1
        self._worker = acquire_worker()

    def build(self, candidate: Candidate) -> Built:
        raise NotImplementedError

    def loader(self, candidate: Candidate, artifact: Path) -> tuple[str, tuple[Any, ...]]:
        """`module:function` and its picklable args, called in the worker to get the kernel callable."""
        raise NotImplementedError

    def build_all(self, candidates: list[Candidate]) -> list[Built]:
        with ThreadPoolExecutor(self.build_workers) as pool:  # compilers run as subprocesses or release the GIL
            return list(pool.map(self.build, candidates))

    def evaluate(self, candidates: list[Candidate],
                 on_result: Callable[[int, EvalResult], None] | None = None) -> list[EvalResult]:
        """All builds first, then timing: nothing compiles while a kernel is being timed. `on_result(i, result)`
        is called as each result is known."""
        if candidates:
            self._worker.start()  # a new worker imports torch while the candidates build
        results: list[EvalResult] = []
        for cand, b in zip(candidates, self.build_all(candidates)):
            if not b.ok or b.artifact is None:
                results.append(EvalResult.failure("compile", "compilation failed", stderr=b.log, compile_s=b.seconds))
                if on_result:
                    on_result(len(results) - 1, results[-1])
                continue
            # A per-candidate seed: inputs are fresh for every candidate, yet a re-run reproduces them.
            settings = dataclasses.replace(self.settings, seed=self.settings.seed * 1_000_003 + int(cand.code_hash[:8], 16))
            loader, args = self.loader(cand, b.artifact)
            try:
                res = EvalResult(**self._worker.run(self.job, self.workload, loader, args, settings, timeout_s=self.settings.timeout_s))
            except WorkerTimeout as exc:
                res = EvalResult.failure("timeout", str(exc))
            except WorkerCrash as exc:
                res = EvalResult.failure("crash", str(exc))
            except RuntimeError as exc:
                res = EvalResult.failure("crash", "evaluation raised an exception", stderr=str(exc)[-4000:])
            if res.stage in self.restart_after:
                self._worker.close()
            res.compile_s = b.seconds
            results.append(res)
            if on_result:
                on_result(len(results) - 1, res)
        return results

    def run_off(self, candidates: list[Candidate]) -> dict[str, Any] | None:
        """Time `candidates` (each already evaluated correct) again, interleaved with each other and eager in one
        timing loop, so that the one the search measured fastest must also win where all are measured in the
        same time window. Each gets the whole timing budget, twice its share in an evaluation. Returns the
        `run_off` job's {"timing": {code_hash: ...}, "wrong": {code_hash: why}}, or None without a
        `run_off_job`; raises RunOffError."""
        if self.run_off_job is None:
            return None
        kernels = {}
        for cand, b in zip(candidates, self.build_all(candidates)):  # built before: found on disk
            if not b.ok or b.artifact is None:
                raise RunOffError(f"finalist {cand.id} did not build again: {b.log[-500:]}")
            kernels[cand.code_hash] = self.loader(cand, b.artifact)
        budget_ms = self.settings.timing_budget_ms * (len(candidates) + 1)  # and eager
        try:
            return self._worker.run(self.run_off_job, self.workload, kernels, budget_ms, self.settings.device,
                                    self.settings.seed, timeout_s=self.settings.timeout_s * len(candidates))
        except RuntimeError as exc:  # WorkerTimeout, WorkerCrash, or the job's own error
            self._worker.close()
            raise RunOffError(f"{type(exc).__name__}: {str(exc)[-1000:]}") from exc

    def close(self) -> None:
        """Hand the worker process back for the next search (an evaluator used after this starts a new one)."""
        worker, self._worker = self._worker, IsolatedWorker()
        release_worker(worker)

    def __enter__(self) -> "RoundEvaluator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
