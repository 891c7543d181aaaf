"""Host-side cost of one CUDA kernel call from Python (CudaKernel.__call__), with the driver's launch calls
replaced by no-ops, so that it runs on any machine with cuda-python: what the runtime itself adds per op, which
a model without CUDA graphs pays ~100 times per decode step. The baseline, timed interleaved in the same run,
is the same runtime at another git revision (`--previous`, default HEAD~1) or, with `--previous none`, the
bare loop of stubbed driver calls. Prints a table and writes JSON.

    python benchmarks/launch_overhead.py --previous f2c5dcc --json launch_overhead.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autocomp_compile import make_workload  # noqa: E402
from autocomp_compile.targets.cuda import codegen  # noqa: E402
from autocomp_compile.targets.cuda import runtime as current  # noqa: E402


def runtime_at(revision: str) -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:autocomp_compile/targets/cuda/runtime.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "runtime_previous.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("runtime_previous", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_without_gpu(module: types.ModuleType, spec: dict[str, Any], names: list[str], stream: Any) -> Any:
    """A CudaKernel of `module` set up as its __init__ would be, minus the GPU (no module load)."""
    k = object.__new__(module.CudaKernel)
    k.spec, k.names, k.dim_names, k.alignment = spec, names, [], int(spec.get("align", 1))
    functions = [None] * len(spec["kernels"])
    if hasattr(k, "_setup"):
        k._setup(functions, (9, 0), lambda: stream, "cpu")
    else:  # runtimes before _setup
        k._functions, k._configs = functions, [None] * len(functions)
        k._scratch = {n: torch.zeros(int(c), dtype=module._SCRATCH_DTYPES[dt]) for n, (c, dt) in spec["scratch"].items()}
        k._cached_key, k._cached = None, []
    return k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--previous", default="HEAD~1", help="git revision of the baseline runtime, or 'none'")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from cuda.bindings import driver

    ok = (driver.CUresult.CUDA_SUCCESS,)
    driver.cuLaunchKernel = lambda *a: ok
    driver.cuLaunchKernelEx = lambda *a: ok
    torch.cuda.current_stream = lambda *a: types.SimpleNamespace(cuda_stream=0)  # older runtimes ask torch
    torch.Tensor.is_cuda = property(lambda self: True)  # older runtimes check is_cuda
    current._driver, current._SUCCESS = driver, driver.CUresult.CUDA_SUCCESS
    stream = driver.CUstream(0)
    w = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    spec = current.launch_spec(codegen.generate(w, codegen.legalize(w, dict(naive=False, vec=True, fuse=True, warps=8))))
    names = [t.name for t in w.tensors]
    tensors = [torch.empty(16, dtype=torch.bfloat16) for _ in names]
    calls: dict[str, Callable[[], None]] = {"current": lambda k=kernel_without_gpu(current, spec, names, stream): k(tensors)}
    if args.previous == "none":
        launches = [(None, *k["grid"], *k["block"], 0, stream, 0, 0) for k in spec["kernels"]]
        calls["bare driver calls"] = lambda: [driver.cuLaunchKernel(*a) for a in launches]
    else:
        previous = runtime_at(args.previous)
        if hasattr(previous, "_driver"):  # runtimes that import the driver lazily, in CudaKernel.__init__
            previous._driver, previous._SUCCESS = driver, driver.CUresult.CUDA_SUCCESS
        old = kernel_without_gpu(previous, spec, names, stream)
        calls[f"runtime at {args.previous}"] = lambda: old(tensors)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.rounds):
        for name in calls if r % 2 == 0 else reversed(list(calls)):
            fn = calls[name]
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    medians = {name: statistics.median(v) for name, v in times.items()}
    base = [n for n in medians if n != "current"][0]
    print(f"two-kernel MLP ({len(spec['kernels'])} launches), driver launches stubbed; median of {args.rounds} rounds")
    print(f"{'variant':>28} {'us per call':>12}")
    for name, us in medians.items():
        print(f"{name:>28} {us:12.2f}")
    print(f"current vs {base}: {medians[base] / medians['current']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"us_per_call": medians, "rounds": times,
                                               "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
