"""benchmarks/kernels.py: which workloads each target benchmarks, and its seed schedules."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from autocomp_compile import get_target

_spec = importlib.util.spec_from_file_location("kernels_benchmark", Path(__file__).parents[2] / "benchmarks" / "kernels.py")
kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels)


def test_prefill_gemms_are_benchmarked_on_cuda_only():
    cpu = [label for label, _ in kernels.workloads("bf16", "cpu")]
    cuda = dict(kernels.workloads("bf16", "cuda"))
    assert not any("prefill s=512" in label for label in cpu)
    assert cuda["mlp prefill s=512"].params["batch"] == 512
    # `--only "mlp decode"` (the decode MLP stage of cuda_check.sh) must not pick the prefill MLP
    assert [label for label in cuda if label.startswith("mlp decode")] == ["mlp decode"]


def test_the_prefill_stage_seed_is_a_tensor_core_schedule():
    target = get_target("cuda")
    for label, w in kernels.workloads("bf16", "cuda"):
        if "prefill s=512" in label:
            assert target.legalize(w, {"naive": False, "mma": True})["mma"], label
