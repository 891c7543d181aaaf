"""Fixtures shared by the whole suite: temporary build cache, a worker-importable test package,
and a FakeEvaluator so beam search runs without compiling anything."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from autocomp_compile.targets.base import EvalResult
from autocomp_compile.targets.cpu.target import CpuTarget

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Builds go to a temp dir; worker processes (started with `python -c`) can import `tests.*`."""
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + (os.pathsep + old if old else ""))


# ---------------------------------------------------------------- fake evaluation

_ISA_SPEED = {"scalar": 1.0, "avx2": 0.5, "avx512": 0.35, "avx512bf16": 0.3}
_THREAD_SPEED = {"serial": 1.0, "static": 0.6, "dynamic": 0.55}


def fake_latency(knobs: dict) -> float:
    """A deterministic, knob-dependent latency in ms: faster ISAs, threads, blocking help."""
    t = 10.0 * _ISA_SPEED[knobs["isa"]] * _THREAD_SPEED[knobs["threads"]]
    t *= 1.0 + 0.001 * knobs.get("chunk", 0)
    t *= {1: 1.0, 2: 0.9, 4: 0.85, 8: 0.88}.get(knobs.get("rows", 1), 1.0)
    t *= {1: 1.0, 2: 0.95, 4: 0.97}.get(knobs.get("unroll", 1), 1.0)
    t *= 1.0 if not knobs.get("prefetch") else 0.98 + knobs["prefetch"] / 1e5
    t *= 0.9 if knobs.get("bf16_split") else 1.0
    t *= 0.9 if knobs.get("fuse") else 1.0
    t *= 0.8 if knobs.get("online") else 1.0
    t *= 0.9 if knobs.get("gqa_share") else 1.0
    t *= 1.0 + abs(knobs.get("kv_block", 64) - 64) / 1000
    t *= {1: 1.0, 2: 0.95, 4: 0.92, 8: 0.96}.get(knobs.get("q_block", 1), 1.0)
    return t


class EvaluatorCalled(AssertionError):
    pass


class FakeEvaluator:
    """Evaluator protocol without compilation: latency = `latency(knobs)`, correctness = not `bad(knobs)`.

    `interrupt_after`: raise KeyboardInterrupt when that many candidates have been evaluated in total.
    `forbid`: raise if called at all (a resumed run must not evaluate anything).
    """

    def __init__(self, latency=fake_latency, bad=None, interrupt_after=None, forbid=False, baseline_ms=2.0):
        self.latency, self.bad = latency, bad or (lambda k: False)
        self.interrupt_after, self.forbid, self.baseline_ms = interrupt_after, forbid, baseline_ms
        self.seen: list[str] = []  # code hashes, in evaluation order
        self.batches: list[int] = []
        self.closed = False

    def evaluate(self, candidates, on_result=None):
        if self.forbid:
            raise EvaluatorCalled(f"evaluator called with {len(candidates)} candidates")
        self.batches.append(len(candidates))
        results = []
        for c in candidates:
            if self.interrupt_after is not None and len(self.seen) >= self.interrupt_after:
                raise KeyboardInterrupt
            self.seen.append(c.code_hash)
            if self.bad(c.knobs):
                results.append(EvalResult.failure("correctness", "fake mismatch", max_abs_error=1.0))
            else:
                lat = self.latency(c.knobs)
                results.append(EvalResult(
                    correct=True, stage="ok", latency_ms=lat, latency_p99_ms=lat * 1.1,
                    baseline_ms=self.baseline_ms, runs=10, max_abs_error=0.0,
                ))
            if on_result:
                on_result(len(results) - 1, results[-1])
        return results

    def close(self):
        self.closed = True


class FakeTarget(CpuTarget):
    """The real CPU target (lowering, menu, codegen) with a fake evaluator; fixed ISAs so runs do
    not depend on the host."""

    def __init__(self, evaluator, isas=("scalar", "avx2")):
        super().__init__(list(isas))
        self.evaluator = evaluator

    def make_evaluator(self, workload, build_dir=None, settings=None):
        return self.evaluator


@pytest.fixture
def fake_evaluator_cls():
    return FakeEvaluator


@pytest.fixture
def fake_target_cls():
    return FakeTarget
