"""The CUDA target: CUDA C++ built with NVRTC, launched through the driver API on torch's stream."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from autocomp_compile.evaluation.evaluator import Built, RoundEvaluator
from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.cuda import codegen
from autocomp_compile.targets.cuda.build import build, nvrtc_available, nvrtc_version
from autocomp_compile.targets.cuda.runtime import launch_spec
from autocomp_compile.paths import build_dir
from autocomp_compile.targets.base import ScheduleSpaceTarget
from autocomp_compile.workload import Workload

LOADER = "autocomp_compile.targets.cuda.runtime:load"
MIN_COMPUTE_CAPABILITY = (7, 5)  # NVRTC 13 dropped sm_70 and below


def default_build_dir() -> Path:
    return build_dir("cuda")


@functools.lru_cache(maxsize=1)
def _device_info() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "sm": f"{props.major}{props.minor}", "sms": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None), "cuda": torch.version.cuda}
    try:
        from cuda.bindings import driver

        driver.cuInit(0)
        info["driver"] = driver.cuDriverGetVersion()[1]
    except Exception:  # noqa: BLE001 - the fingerprint is still useful without it
        pass
    return info


class CudaEvaluator(RoundEvaluator):
    restart_after = ("runtime", "load", "crash")  # a CUDA error can leave the context unusable

    def __init__(self, workload: Workload, build_dir: Path, settings: EvalSettings | None, arch: str):
        super().__init__(workload, build_dir, settings)
        self.arch = arch

    def build(self, candidate: Candidate) -> Built:
        try:
            launch_spec(candidate.code)
        except Exception as exc:  # noqa: BLE001
            return Built(False, None, 0.0, str(exc))
        b = build(candidate.code, self.arch, self.build_dir)
        return Built(b.ok, b.cubin_path, b.seconds, b.log)

    def loader(self, candidate: Candidate, artifact: Path) -> tuple[str, tuple[Any, ...]]:
        w = self.workload
        names = [t.name for t in w.tensors]
        specs = [(list(t.shape), t.dtype) for t in w.tensors]  # the runtime refuses any other shape or dtype
        bounds = [w.params.get(f"max_{d}") for d in w.runtime_dims]  # decode's kv_len <= max_kv_len
        return LOADER, (str(artifact), candidate.code, names, list(w.runtime_dims), specs, bounds)


class CudaTarget(ScheduleSpaceTarget):
    """The CUDA target. `CudaTarget(deterministic=True)` (or `deterministic_variant()`) searches and caches only
    kernels whose results are bit-reproducible: no float atomics (the one-kernel and streaming MLPs), and every
    candidate run twice more on the same inputs must match itself bit for bit. Its fingerprint says so, so its
    kernels have their own cache entries."""

    name = "cuda"
    language = "cuda"
    codegen = codegen
    naive_plan = "Naive translation: one thread per output element (or one block per attention row)."
    ORDER_DEPENDENT_MENU = ("one_kernel_mlp", "streaming_mlp", "mlp_chunk")

    def __init__(self, deterministic: bool = False):
        self.deterministic = deterministic

    def deterministic_variant(self) -> "CudaTarget":
        """This target restricted to bit-reproducible kernels (see the class docstring)."""
        if self.deterministic:
            return self
        if not hasattr(self, "_deterministic"):
            self._deterministic = CudaTarget(deterministic=True)
        return self._deterministic

    def available(self) -> tuple[bool, str]:
        try:
            import torch
        except ImportError:
            return False, "torch is not installed"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < MIN_COMPUTE_CAPABILITY:
            need = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
            return False, (f"GPU compute capability {major}.{minor} (sm_{major}{minor}) is below the minimum {need} "
                           f"(sm_{need.replace('.', '')}) that NVRTC 13 can target")
        if not nvrtc_available():
            return False, "NVRTC bindings missing: pip install 'autocomp-compile[cuda]' (cuda-bindings, nvidia-cuda-nvrtc)"
        return True, ""

    @property
    def arch(self) -> str:
        ok, _ = self.available()
        return f"sm_{_device_info()['sm']}" if ok else "sm_90"

    def fingerprint(self) -> dict[str, Any]:
        info = _device_info() if self.available()[0] else {}
        fp = {"target": self.name, **info, "compiler": nvrtc_version() if nvrtc_available() else "nvcc",
              "codegen": codegen.CODEGEN_VERSION}
        if self.deterministic:
            fp["deterministic"] = True
        return fp

    def describe(self) -> str:
        info = _device_info()
        return f"{info['gpu']} (sm_{info['sm']}, {info['sms']} SMs)"

    def legalize(self, workload: Workload, knobs: dict[str, Any]) -> dict[str, Any]:
        if self.deterministic:
            knobs = {**knobs, **{name: False for name in codegen.ORDER_DEPENDENT_KNOBS}}
        return codegen.legalize(workload, knobs)

    def menu(self, workload: Workload):
        from autocomp_compile.agents.menu import cuda_menu

        items = cuda_menu(workload)
        return [m for m in items if m.id not in self.ORDER_DEPENDENT_MENU] if self.deterministic else items

    def make_evaluator(self, workload: Workload, build_dir: Path | None = None, settings: EvalSettings | None = None) -> CudaEvaluator:
        import dataclasses

        settings = dataclasses.replace(settings or EvalSettings(), device="cuda")
        if self.deterministic:  # the variant always checks, whatever settings it was given
            settings = dataclasses.replace(settings, deterministic=True)
        return CudaEvaluator(workload, build_dir or default_build_dir(), settings, self.arch)


__all__ = ["CudaTarget"]
