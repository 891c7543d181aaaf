"""The Neuron evaluator: NKI candidates on a real NeuronCore (a trn1 host with `neuronx-cc` installed).

As the seed does it: all candidates of a round are first checked in parallel with every CPU core
(`nki.simulate_kernel`: the NKI front end traces the kernel and runs it on the CPU, so a kernel the compiler
rejects fails here without touching the device), then each is run one at a time on the NeuronCore:
correctness with `nki.baremetal` on fresh random inputs, then latency with `nki.benchmark` (P50 and P99 from
`benchmark_result.nc_latency`, in microseconds). Each step is a subprocess of this module (`python -m
autocomp_compile.targets.nki.neuron {simulate,run} ...`) that prints one `AUTOCOMP_RESULT <json>` line.

UNVERIFIED: written against the NKI 0.1 API documentation; no trn1 was available to run it.
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from autocomp_compile.evaluation.evaluator import Built, RoundEvaluator
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import EvalResult
from autocomp_compile.workload import Workload, workload_from_dict

RESULT_TAG = "AUTOCOMP_RESULT "


@functools.lru_cache(maxsize=1)
def neuronxcc_version() -> str:
    """The installed neuronx-cc version, or "" when the Neuron compiler is not importable here."""
    if importlib.util.find_spec("neuronxcc") is None:
        return ""
    try:
        return importlib.metadata.version("neuronx-cc")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def instance_type() -> str:
    """The EC2 instance type as the DMI product name gives it (e.g. trn1.2xlarge), else "trn1"."""
    p = Path("/sys/devices/virtual/dmi/id/product_name")
    try:
        return p.read_text().strip() or "trn1"
    except OSError:
        return "trn1"


def command(mode: str, code_path: Path, workload: Workload, seed: int = 0, sets: int = 3, warmup: int = 10,
            iters: int = 100, python: str = sys.executable) -> list[str]:
    """The subprocess command for `mode` "simulate" (CPU, parallel) or "run" (NeuronCore, one at a time)."""
    if mode not in ("simulate", "run"):
        raise ValueError(f"mode must be 'simulate' or 'run', got {mode!r}")
    cmd = [python, "-m", "autocomp_compile.targets.nki.neuron", mode, str(code_path),
           "--workload", json.dumps(workload.describe(), sort_keys=True), "--seed", str(seed), "--sets", str(sets)]
    if mode == "run":
        cmd += ["--warmup", str(warmup), "--iters", str(iters), "--neff", str(code_path.with_suffix(".neff"))]
    return cmd


def parse_result(stdout: str, stderr: str = "", returncode: int = 0) -> EvalResult:
    """An EvalResult from a step's output: the last `AUTOCOMP_RESULT` line, else a failure with the logs."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            fields = json.loads(line[len(RESULT_TAG):])
            return EvalResult(**{**fields, "extra": {**fields.get("extra", {}), "simulated": False}})
    stage = "crash" if returncode else "runtime"
    return EvalResult.failure(stage, f"no result line (exit code {returncode})", stdout=stdout[-4000:],
                              stderr=stderr[-4000:], extra={"simulated": False})


class NeuronEvaluator(RoundEvaluator):
    """Parallel simulate-checks (all CPU cores), then correctness and `nki.benchmark` one at a time."""

    warmup, iters = 10, 100
    run_off_job = None  # `nki.benchmark` runs in a subprocess per kernel: finalists cannot share a timing loop

    def build(self, candidate: Candidate) -> Built:
        path = self.build_dir / f"{candidate.code_hash}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(candidate.code)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(command("simulate", path, self.workload, self.settings.seed, 1), capture_output=True,
                               text=True, timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            return Built(False, None, time.perf_counter() - t0, "nki.simulate_kernel timed out")
        res = parse_result(p.stdout, p.stderr, p.returncode)
        return Built(res.correct, path if res.correct else None, time.perf_counter() - t0,
                     "" if res.correct else f"{res.message}\n{res.stderr}")

    def evaluate(self, candidates: list[Candidate]) -> list[EvalResult]:
        results = []
        for cand, b in zip(candidates, self.build_all(candidates)):
            if not b.ok or b.artifact is None:
                results.append(EvalResult.failure("compile", "NKI front end / simulation failed", stderr=b.log,
                                                  compile_s=b.seconds, extra={"simulated": False}))
                continue
            cmd = command("run", b.artifact, self.workload, self.settings.seed, self.settings.correctness_sets,
                          self.warmup, self.iters)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.settings.timeout_s)
                res = parse_result(p.stdout, p.stderr, p.returncode)
            except subprocess.TimeoutExpired:
                res = EvalResult.failure("timeout", f"no result within {self.settings.timeout_s} s",
                                         extra={"simulated": False})
            res.compile_s = b.seconds
            results.append(res)
        return results


# ---------------------------------------------------------------- the subprocess side (runs on the trn1 host)


def _emit(**fields: Any) -> None:
    print(RESULT_TAG + json.dumps(fields), flush=True)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autocomp_compile.targets.nki.neuron")
    ap.add_argument("mode", choices=("simulate", "run"))
    ap.add_argument("code")
    ap.add_argument("--workload", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--neff", default="")
    a = ap.parse_args(argv)
    import neuronxcc.nki as nki  # noqa: F401 - fails loudly off a Neuron host

    from autocomp_compile.evaluation.checks import compare
    from autocomp_compile.evaluation.job import correctness_dims
    from autocomp_compile.references import InputFactory, get_kind
    from autocomp_compile.targets.nki.evaluate import to_numpy, to_torch

    w = workload_from_dict(json.loads(a.workload))
    namespace: dict[str, Any] = {"__name__": "nki_kernel"}
    exec(compile(Path(a.code).read_text(), a.code, "exec"), namespace)  # noqa: S102
    kernel = namespace["kernel"]
    factory, spec = InputFactory(a.seed), get_kind(w.kind)
    run = nki.simulate_kernel if a.mode == "simulate" else lambda k, *xs: nki.baremetal(k)(*xs)
    worst = 0.0
    for s, dims in enumerate(correctness_dims(w, a.sets, a.seed)):  # tuned, 1, random KV lengths
        inputs = factory.inputs(w, variant=s)
        ref = spec.reference(inputs, w.params, dict(zip(w.runtime_dims, dims)))
        try:
            out = run(kernel, *[to_numpy(inputs[t.name]) for t in w.inputs], *dims)
        except Exception as exc:  # noqa: BLE001
            _emit(correct=False, stage="runtime", message=f"{type(exc).__name__}: {exc}")
            return 0
        m = compare(w.outputs[0].name, to_torch(out).to(w.outputs[0].torch_dtype), ref[w.outputs[0].name])
        worst = max(worst, m.max_abs_error)
        if not m.ok:
            _emit(correct=False, stage="correctness", message=f"input set {s}: {m.message}", max_abs_error=m.max_abs_error)
            return 0
    if a.mode == "simulate":
        _emit(correct=True, stage="ok", max_abs_error=worst)
        return 0
    dims = list(w.runtime_dims.values())  # timed at the tuned values
    args = [to_numpy(v) for v in factory.inputs(w).values()]
    bench = nki.benchmark(warmup=a.warmup, iters=a.iters, save_neff_name=a.neff or None)(kernel)
    bench(*args, *dims)
    lat = bench.benchmark_result.nc_latency
    p50, p99 = lat.get_latency_percentile(50), lat.get_latency_percentile(99)  # microseconds
    _emit(correct=True, stage="ok", max_abs_error=worst, latency_ms=p50 / 1e3, latency_p99_ms=p99 / 1e3, runs=a.iters,
          extra={"device": os.environ.get("NEURON_RT_VISIBLE_CORES", "0")})
    return 0


if __name__ == "__main__":
    sys.exit(_main())
