"""The NKI target: NKI kernels for Trainium. With `neuronxcc` importable (a trn1 host) candidates are compiled
and benchmarked on the NeuronCore (`neuron.py`); elsewhere they run on the NumPy emulator and their latency is
the trn1 cost model's SIMULATED estimate, which the fingerprint says so that the two never share cache entries."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from autocomp_compile.evaluation.evaluator import Built, RoundEvaluator
from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.paths import build_dir as default_build_dir
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.nki import codegen, neuron
from autocomp_compile.targets.nki.cost_model import MODEL_NAME
from autocomp_compile.targets.base import ScheduleSpaceTarget
from autocomp_compile.workload import Workload

BACKEND_ENV = "AUTOCOMP_NKI_BACKEND"  # "emulator" forces the emulator even where neuronxcc is installed


class EmulatorEvaluator(RoundEvaluator):
    """Builds = syntax and definition checks; the worker runs the emulator and the cost model."""

    job = "autocomp_compile.targets.nki.evaluate:check_and_estimate"
    run_off_job = None  # an estimate does not depend on when it was made

    def build(self, candidate: Candidate) -> Built:
        t0 = time.perf_counter()
        try:
            compile(candidate.code, "<nki kernel>", "exec")
        except SyntaxError as exc:
            return Built(False, None, time.perf_counter() - t0, f"SyntaxError: {exc}")
        path = self.build_dir / f"{candidate.code_hash}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(candidate.code)
        return Built(True, path, time.perf_counter() - t0, "")

    def loader(self, candidate: Candidate, artifact: Path) -> tuple[str, tuple[Any, ...]]:
        return "autocomp_compile.targets.nki.evaluate:load", (candidate.code,)


class NkiTarget(ScheduleSpaceTarget):
    name = "nki"
    language = "nki"
    codegen = codegen
    naive_plan = ("Naive translation: sequential loops, 128x128 weight tiles, one transpose per PSUM "
                  "evacuation, activations reloaded per tile, partial sums added on VectorE.")

    @property
    def backend(self) -> str:
        """"neuron" on a host with the Neuron compiler, else "emulator"."""
        if os.environ.get(BACKEND_ENV, "") == "emulator":
            return "emulator"
        return "neuron" if neuron.neuronxcc_version() else "emulator"

    def available(self) -> tuple[bool, str]:
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            return False, "ml_dtypes is missing (the NKI emulator's bf16): pip install 'autocomp-compile[nki]'"
        return True, ""

    def fingerprint(self) -> dict[str, Any]:
        if self.backend == "neuron":
            return {"target": self.name, "backend": "neuron", "simulated": False, "instance": neuron.instance_type(),
                    "compiler": neuron.neuronxcc_version(), "codegen": codegen.CODEGEN_VERSION}
        return {"target": self.name, "backend": "emulator-trn1-model", "simulated": True, "cost_model": MODEL_NAME,
                "codegen": codegen.CODEGEN_VERSION}

    def describe(self) -> str:
        if self.backend == "neuron":
            return f"Trainium NeuronCore ({neuron.instance_type()}), neuronx-cc {neuron.neuronxcc_version()}"
        return "NKI emulator (NumPy) + trn1 cost model: latencies are SIMULATED, not measured"

    def check_workload(self, workload: Workload) -> None:
        """Raise `WorkloadError` when the NKI kernels cannot compute `workload`'s shape (before any search)."""
        codegen.check(workload)

    def legalize(self, workload: Workload, knobs: dict[str, Any]) -> dict[str, Any]:
        return codegen.legalize(workload, knobs)

    def menu(self, workload: Workload):
        from autocomp_compile.agents.menu import nki_menu

        return nki_menu(workload)

    def make_evaluator(self, workload: Workload, build_dir: Path | None = None,
                       settings: EvalSettings | None = None) -> RoundEvaluator:
        settings = dataclasses.replace(settings or EvalSettings(), device="cpu", time_baseline=False)
        where = build_dir or default_build_dir("nki")
        if self.backend == "neuron":
            return neuron.NeuronEvaluator(workload, where, settings)
        return EmulatorEvaluator(workload, where, settings)


__all__ = ["NkiTarget", "EmulatorEvaluator"]
