"""The worker job for the emulated NKI target: fresh-input correctness on the emulator, then the trn1 cost
model's SIMULATED latency (nothing is timed: on a machine without Trainium there is nothing to time)."""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch

from autocomp_compile.evaluation.checks import compare
from autocomp_compile.evaluation.job import EvalSettings, dims_note, correctness_dims
from autocomp_compile.references import InputFactory, get_kind
from autocomp_compile.targets.nki.cost_model import estimate
from autocomp_compile.targets.nki.emulator import NkiRuleError, NkiUnsupported, load_source, run_kernel
from autocomp_compile.workload import Workload


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as the emulator's HBM array (bf16 as `ml_dtypes.bfloat16`, copied)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.contiguous().numpy().copy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def load(code: str) -> Any:
    """Loader used by the evaluator: the kernel function of `code`, for the emulator."""
    return load_source(code)


def check_and_estimate(state: dict[str, Any], w: Workload, loader: str, loader_args: tuple,
                       settings: EvalSettings) -> dict[str, Any]:
    """Returns a dict of EvalResult fields; `extra` carries `simulated: True` and the cost breakdown."""
    sim = {"simulated": True}
    try:
        kernel = load_source(loader_args[0])
    except Exception as exc:  # noqa: BLE001 - any load failure fails this candidate only
        return dict(correct=False, stage="load", message=f"{type(exc).__name__}: {exc}", extra=sim)
    spec = get_kind(w.kind)
    factory: InputFactory = state.setdefault("inputs", InputFactory(settings.seed))
    factory.gen.manual_seed(settings.seed)
    worst, tuned_run = 0.0, None
    for s, dims in enumerate(correctness_dims(w, settings.correctness_sets, settings.seed)):
        inputs = factory.inputs(w, variant=s)
        ref = spec.reference(inputs, w.params, dict(zip(w.runtime_dims, dims)))
        arrays = [to_numpy(inputs[t.name]) for t in w.inputs]
        originals = [a.copy() for a in arrays]
        try:
            run = run_kernel(kernel, arrays, dims)
        except NkiRuleError as exc:
            return dict(correct=False, stage="runtime", message=str(exc), extra={**sim, "rule": exc.rule})
        except NkiUnsupported as exc:
            return dict(correct=False, stage="runtime", message=f"not supported by the NKI emulator: {exc}", extra=sim)
        except Exception as exc:  # noqa: BLE001
            return dict(correct=False, stage="runtime", message=f"{type(exc).__name__}: {exc}", extra=sim)
        for spec_t, a, before in zip(w.inputs, arrays, originals):
            if not np.array_equal(a.view(np.uint8), before.view(np.uint8)):
                return dict(correct=False, stage="inputs_modified", message=f"input {spec_t.name!r} was modified by the kernel",
                            extra=sim)
        if len(run.outputs) != len(w.outputs):
            return dict(correct=False, stage="runtime", extra=sim,
                        message=f"kernel returned {len(run.outputs)} output(s), the workload has {len(w.outputs)}")
        for t, out in zip(w.outputs, run.outputs):
            m = compare(t.name, to_torch(out).to(t.torch_dtype), ref[t.name])
            worst = max(worst, m.max_abs_error)
            if not m.ok:
                return dict(correct=False, stage="correctness", max_abs_error=m.max_abs_error, extra=sim,
                            message=f"input set {s}{dims_note(w, dims)}: {m.message}")
        if tuned_run is None:  # set 0 runs at the tuned runtime dims, where the cost model estimates latency
            tuned_run = run
    run = tuned_run
    est = estimate(run.ops if run else [])
    ms = est.latency_us / 1e3
    return dict(correct=True, stage="ok", max_abs_error=worst, latency_ms=ms, latency_p99_ms=ms, runs=1,
                baseline_ms=None, extra={**sim, "cost_model": est.to_dict(), "peak_sbuf_bytes": run.peak_sbuf_bytes if run else 0})
