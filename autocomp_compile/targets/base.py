"""The Target protocol, its typed evaluation result, and the registry that finds targets.

A new hardware family is a subpackage of `autocomp_compile.targets` that registers a factory here;
nothing in search/ or agents/ knows about any particular target.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    from autocomp_compile.agents.menu import MenuItem
    from autocomp_compile.search.candidate import Candidate
    from autocomp_compile.workload import Workload


class TargetError(RuntimeError):
    """Unknown or unavailable target."""


class RunOffError(RuntimeError):
    """An evaluator's run-off did not finish (its worker crashed or timed out, a finalist did not build)."""


@dataclass
class EvalResult:
    """Outcome of building, checking and timing one candidate.

    `stage` names where it stopped: "ok", "compile", "load", "crash", "timeout", "runtime", "correctness",
    "out_of_bounds", "inputs_modified", "harness_modified", "beyond_roofline", "nondeterministic"; `message` says why, in words a user can act on.
    """

    correct: bool
    stage: str
    message: str = ""
    max_abs_error: float | None = None
    latency_ms: float | None = None
    latency_p99_ms: float | None = None
    baseline_ms: float | None = None
    runs: int = 0
    compile_s: float | None = None
    stdout: str = ""
    stderr: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        return cls(**d)

    @classmethod
    def failure(cls, stage: str, message: str, **kw: Any) -> "EvalResult":
        return cls(correct=False, stage=stage, message=message, **kw)


@runtime_checkable
class Target(Protocol):
    """What the search needs from a hardware family. A target may also define `check_workload(workload)`,
    raising `WorkloadError` for a shape none of its kernels computes (NKI's 128-row tiles): `optimize()` and the
    CLI call it before any work; and `schedule_kinds(kind)`, the kinds whose schedules (knobs) mean the same as
    `kind`'s, which schedule reuse may then replay on each other (re-legalised; `kind` alone by default)."""

    name: str
    language: str

    def available(self) -> tuple[bool, str]:
        """(True, "") when kernels can run here, else (False, reason)."""

    def fingerprint(self) -> dict[str, Any]:
        """ISA / device / compiler identity; part of every cache key."""

    def lower(self, workload: "Workload") -> "Candidate":
        """The first correct, naive kernel for `workload` (the translation step)."""

    def menu(self, workload: "Workload") -> list["MenuItem"]:
        """Optimizations that apply to this workload on this target."""

    def generate(self, workload: "Workload", knobs: dict[str, Any]) -> str:
        """Source code for the schedule `knobs`."""

    def legalize(self, workload: "Workload", knobs: dict[str, Any]) -> dict[str, Any]:
        """Clamp a schedule to what this workload's shape and this host allow."""

    def make_evaluator(self, workload: "Workload", build_dir: Any = None, settings: Any = None) -> "Evaluator":
        """An evaluator bound to `workload`; close it when done."""


class ScheduleSpaceTarget:
    """`generate` and `lower` for a target whose kernels come from a codegen module's schedule space.

    Subclasses set `codegen` (a module with `naive_knobs(workload)` and `generate(workload, knobs)`),
    `naive_plan` (the root candidate's plan text) and `language`, and define `legalize`.
    """

    codegen: Any
    naive_plan: str
    language: str

    def legalize(self, workload: "Workload", knobs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def generate(self, workload: "Workload", knobs: dict[str, Any]) -> str:
        return self.codegen.generate(workload, self.legalize(workload, knobs))

    def lower(self, workload: "Workload") -> "Candidate":
        from autocomp_compile.search.candidate import Candidate

        knobs = self.legalize(workload, self.codegen.naive_knobs(workload))
        return Candidate(id="root", parent_id=None, iteration=0, language=self.language,
                         code=self.codegen.generate(workload, knobs), plan=self.naive_plan, knobs=knobs,
                         origin="lower")


class Evaluator(Protocol):
    def evaluate(self, candidates: list["Candidate"],
                 on_result: Callable[[int, EvalResult], None] | None = None) -> list[EvalResult]:
        """Build, check and time candidates; one failure never stops the others. `on_result(i, result)`, where
        an evaluator offers it, is called as soon as candidate i's result is known: the search saves it at once,
        so that an interrupted run loses only the candidate in hand.

        An evaluator may also offer `run_off(candidates)`: the search's finalists timed again, interleaved with
        each other and eager in one timing loop, returning {"timing": {code_hash: {"median_ms", ...}, "eager":
        ...}, "wrong": {code_hash: why}}, or None where its measurements do not depend on when they were taken
        (a cost model); it raises `RunOffError`."""

    def close(self) -> None: ...


_FACTORIES: dict[str, str] = {
    "cpu": "autocomp_compile.targets.cpu.target:CpuTarget",
    "cuda": "autocomp_compile.targets.cuda.target:CudaTarget",
    "nki": "autocomp_compile.targets.nki.target:NkiTarget",
}
_INSTANCES: dict[str, Target] = {}


def register_target(name: str, factory_path: str) -> None:
    """Register `module:Class` as target `name` (imported on first use)."""
    _FACTORIES[name] = factory_path


def target_names() -> list[str]:
    return sorted(_FACTORIES)


def get_target(name: str, deterministic: bool = False) -> Target:
    """The target called `name`; raises `TargetError` naming the valid ones. With `deterministic`, the target
    restricted to bit-reproducible kernels (see `deterministic_variant`)."""
    if name not in _FACTORIES:
        raise TargetError(f"unknown target {name!r}; choose one of {target_names()}")
    if name not in _INSTANCES:
        module, cls = _FACTORIES[name].split(":")
        factory: Callable[[], Target] = getattr(importlib.import_module(module), cls)
        _INSTANCES[name] = factory()
    return deterministic_variant(_INSTANCES[name]) if deterministic else _INSTANCES[name]


def deterministic_variant(target: Target) -> Target:
    """`target` restricted to kernels whose results are bit-reproducible from run to run (what
    `torch.use_deterministic_algorithms(True)` asks of PyTorch's own ops). A target whose schedule space may
    sum with float atomics (CUDA) defines `deterministic_variant()`, with its own cache entries; the others'
    generated kernels fix every reduction order already (CPU, NKI), so they are their own variant."""
    variant = getattr(target, "deterministic_variant", None)
    return variant() if variant is not None else target


def require_available(target: Target) -> None:
    ok, reason = target.available()
    if not ok:
        raise TargetError(f"target {target.name!r} is not available here: {reason}")
