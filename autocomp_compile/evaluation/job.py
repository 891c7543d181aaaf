"""The job a worker runs for one candidate: fresh-input correctness checks, then interleaved timing.

Runs inside `IsolatedWorker`; `state` persists between jobs in that process.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from autocomp_compile.evaluation.checks import compare, time_interleaved
from autocomp_compile.references import InputFactory, empty_outputs, get_kind
from autocomp_compile.workload import Workload


@dataclass(frozen=True)
class EvalSettings:
    correctness_sets: int = 3  # fresh random input sets per candidate
    timing_budget_ms: float = 1000.0  # wall time for the interleaved timing loop
    timeout_s: float = 180.0  # per candidate, correctness and timing together
    seed: int = 0
    time_baseline: bool = True


def _load(loader: str, args: tuple) -> Callable[[list[torch.Tensor], list[int]], None]:
    module, name = loader.split(":")
    return getattr(importlib.import_module(module), name)(*args)


def check_and_time(
    state: dict[str, Any], w: Workload, loader: str, loader_args: tuple, settings: EvalSettings
) -> dict[str, Any]:
    """Returns a dict of EvalResult fields."""
    try:
        kernel = _load(loader, loader_args)
    except Exception as exc:  # noqa: BLE001 - any load failure fails this candidate only
        return dict(correct=False, stage="load", message=str(exc))
    spec = get_kind(w.kind)
    factory: InputFactory = state.setdefault("inputs", InputFactory(settings.seed))
    factory.gen.manual_seed(settings.seed)
    dims = [w.runtime_dims[k] for k in w.runtime_dims]
    worst = 0.0
    inputs: dict[str, torch.Tensor] = {}
    for s in range(settings.correctness_sets):
        inputs = factory.inputs(w)
        snapshot = factory.snapshot(inputs)
        ref = spec.reference(inputs, w.params, w.runtime_dims)
        outs = empty_outputs(w)  # NaN-poisoned: an output the kernel never writes fails the check
        kernel([inputs[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs], dims)
        for name, before in snapshot.items():
            if not torch.equal(inputs[name], before):
                return dict(correct=False, stage="inputs_modified", message=f"input {name!r} was modified by the kernel")
        for name, out in outs.items():
            m = compare(name, out, ref[name])
            worst = max(worst, m.max_abs_error)
            if not m.ok:
                return dict(correct=False, stage="correctness", message=f"input set {s}: {m.message}", max_abs_error=m.max_abs_error)
    outs = empty_outputs(w)
    args = [inputs[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs]
    fns: dict[str, Callable[[], None]] = {"candidate": lambda: kernel(args, dims)}
    if settings.time_baseline:
        base_outs = empty_outputs(w)
        fns["baseline"] = lambda: spec.eager(inputs, base_outs, w.params, w.runtime_dims)
    timing = time_interleaved(fns, budget_ms=settings.timing_budget_ms)
    cand = timing["candidate"]
    # The timed calls' own output must still be right (no caching of results across calls).
    final = compare("out(timed)", outs[w.outputs[0].name], spec.reference(inputs, w.params, w.runtime_dims)[w.outputs[0].name])
    if not final.ok:
        return dict(correct=False, stage="correctness", message=f"after timing: {final.message}")
    return dict(
        correct=True,
        stage="ok",
        max_abs_error=worst,
        latency_ms=cand.median_ms,
        latency_p99_ms=cand.p99_ms,
        runs=cand.runs,
        baseline_ms=timing["baseline"].median_ms if "baseline" in timing else None,
    )


def time_functions(state: dict[str, Any], w: Workload, kernels: dict[str, tuple[str, tuple]], budget_ms: float, with_eager: bool, compiled_eager: bool) -> dict[str, Any]:
    """Benchmark job: time several loaded kernels (and eager / inductor baselines) interleaved on one input set."""
    spec = get_kind(w.kind)
    factory: InputFactory = state.setdefault("inputs", InputFactory(0))
    inputs = factory.inputs(w)
    dims = [w.runtime_dims[k] for k in w.runtime_dims]
    fns: dict[str, Callable[[], None]] = {}
    for name, (loader, args) in kernels.items():
        kern = _load(loader, args)
        outs = empty_outputs(w)
        targs = [inputs[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs]
        fns[name] = lambda kern=kern, targs=targs: kern(targs, dims)
    if with_eager:
        eo = empty_outputs(w)
        fns["eager"] = lambda: spec.eager(inputs, eo, w.params, w.runtime_dims)
    if compiled_eager:

        def eager_fn(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            o = empty_outputs(w, 0.0)
            spec.eager(t, o, w.params, w.runtime_dims)
            return o

        compiled = torch.compile(eager_fn, dynamic=False)
        for _ in range(3):  # compile before anything is timed
            compiled(inputs)
        fns["inductor"] = lambda: compiled(inputs)
    timing = time_interleaved(fns, budget_ms=budget_ms)
    return {name: dict(median_ms=t.median_ms, p99_ms=t.p99_ms, runs=t.runs) for name, t in timing.items()}
