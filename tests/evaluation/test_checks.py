"""Correctness comparison and interleaved timing (evaluation/checks.py), and the job (evaluation/job.py)
run in-process."""
from __future__ import annotations

import time

import pytest
import torch

from autocomp_compile.evaluation.checks import compare, time_interleaved, tolerance
from autocomp_compile.evaluation.job import EvalSettings, check_and_time
from autocomp_compile.targets.cpu import codegen
from autocomp_compile.targets.cpu.evaluator import LOADER
from tests.helpers import build_ok, hand_gemm, hand_gemm_workload, small


def _ref(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g)


def test_tolerances():
    assert tolerance(torch.float32) == (1e-4, 1e-4)
    atol_bf16, rtol_bf16 = tolerance(torch.bfloat16)
    assert atol_bf16 > 1e-3 and rtol_bf16 > 1e-3
    with pytest.raises(KeyError):
        tolerance(torch.float16)


def test_compare_accepts_rounding():
    ref = _ref()
    m = compare("out", ref.to(torch.bfloat16), ref)
    assert m.ok and m.message == "" and 0 < m.max_abs_error < 0.05
    m32 = compare("out", ref.clone(), ref.double())
    assert m32.ok and m32.max_abs_error < 1e-6


def test_compare_rejects_an_error_with_location():
    ref = _ref()
    out = ref.clone()
    out[17] += 0.5
    m = compare("out", out, ref)
    assert not m.ok
    assert "(17,)" in m.message and "out" in m.message
    assert m.max_abs_error == pytest.approx(0.5, rel=1e-5)


def test_compare_error_location_is_multidimensional():
    ref = _ref(24).view(2, 3, 4)
    out = ref.clone()
    out[1, 2, 3] -= 1.0
    m = compare("o", out, ref)
    assert not m.ok and "(1, 2, 3)" in m.message


def test_compare_fp32_is_stricter_than_bf16():
    ref = _ref()
    err = ref + 2e-3 * ref.abs().max()  # 0.2 % of the range: fine for bf16, not for fp32
    assert not compare("out", err.clone(), ref).ok
    assert compare("out", err.to(torch.bfloat16), ref).ok


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_compare_rejects_non_finite(bad):
    ref = _ref()
    out = ref.clone()
    out[5] = bad
    m = compare("out", out, ref)
    assert not m.ok and m.max_abs_error == float("inf")
    assert "non-finite" in m.message and "(5,)" in m.message


def test_compare_shape_mismatch():
    ref = _ref(12)
    m = compare("out", ref.view(3, 4), ref.view(4, 3))
    assert not m.ok and "shape" in m.message


def test_compare_zero_reference_needs_exact_zeros():
    ref = torch.zeros(8)
    assert compare("out", torch.zeros(8), ref).ok
    assert not compare("out", torch.full((8,), 1e-3), ref).ok


def test_time_interleaved_alternates_and_respects_budget():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = time_interleaved(fns, budget_ms=5, min_runs=3, max_runs=7, warmup=1)
    assert set(t) == {"a", "b"}
    assert t["a"].runs == t["b"].runs == 7  # functions this fast hit max_runs
    warm = calls.count("a") - 1 - 7  # warmup (1 plus 0-2 drawn at random) + estimate + runs
    assert calls.count("a") == calls.count("b") and 1 <= warm <= 3
    timed = calls[2 * warm + 2:]
    assert timed[:4] == ["a", "b", "b", "a"]  # alternating order: a b, b a, ...


def test_spot_checks_follow_timed_calls_picked_at_random():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    positions = set()
    for _ in range(20):
        calls.clear()
        time_interleaved(fns, budget_ms=5, min_runs=3, max_runs=50, warmup=1, checks={"a": lambda: calls.append("check")})
        assert calls.count("check") == 2 and all(calls[i - 1] == "a" for i, c in enumerate(calls) if c == "check")
        positions.add(tuple(i for i, c in enumerate(calls) if c == "check"))
    assert len(positions) > 1  # not the same calls every time


def test_time_interleaved_measures_and_bounds_runs():
    fns = {"slow": lambda: time.sleep(0.004), "fast": lambda: None}
    t = time_interleaved(fns, budget_ms=20, min_runs=3, max_runs=100, warmup=0)
    assert t["slow"].runs == t["fast"].runs
    assert 3 <= t["slow"].runs <= 5  # 20 ms budget / >= 4 ms per round
    assert t["slow"].median_ms >= 4.0 > t["fast"].median_ms
    assert t["slow"].p99_ms >= t["slow"].median_ms


def test_time_interleaved_min_runs():
    t = time_interleaved({"slow": lambda: time.sleep(0.01)}, budget_ms=1, min_runs=4, warmup=0)
    assert t["slow"].runs == 4


# ---------------------------------------------------------------- the job, in-process


def test_check_and_time_in_process(tmp_path):
    w = hand_gemm_workload()
    so = build_ok(hand_gemm(), "scalar", tmp_path).so_path
    state: dict = {}
    settings = EvalSettings(correctness_sets=2, timing_budget_ms=5, time_baseline=False)
    out = check_and_time(state, w, LOADER, (str(so), len(w.tensors)), settings)
    assert out["correct"] and out["stage"] == "ok"
    assert out["baseline_ms"] is None and out["latency_ms"] > 0
    assert "inputs" in state  # the input factory persists between jobs
    with_base = check_and_time(state, w, LOADER, (str(so), len(w.tensors)), EvalSettings(timing_budget_ms=5))
    assert with_base["baseline_ms"] > 0


def test_check_and_time_fresh_inputs_per_set(tmp_path):
    """A kernel that memorises its first output passes set 0 and must fail set 1."""
    w = hand_gemm_workload()
    code = hand_gemm(
        before="static float saved[M * N]; static int calls = 0;",
        store="if (calls == 0) saved[m * N + n] = s; out[m * N + n] = saved[m * N + n];",
        after="calls++;",
    )
    so = build_ok(code, "scalar", tmp_path).so_path
    out = check_and_time({}, w, LOADER, (str(so), 3), EvalSettings(correctness_sets=2, timing_budget_ms=5))
    assert out["stage"] == "correctness" and "input set 1" in out["message"]


def test_check_and_time_load_failure(tmp_path):
    w = hand_gemm_workload()
    out = check_and_time({}, w, LOADER, (str(tmp_path / "nope.so"), 3), EvalSettings())
    assert out == dict(correct=False, stage="load", message=out["message"]) and "nope.so" in out["message"]


def order_dependent_loader(so_path: str, n: int):
    """Loads a CPU kernel and labels it as a CUDA launch line with "order_dependent": true would."""
    from autocomp_compile.targets.cpu.runtime import CpuKernel

    kernel = CpuKernel(so_path, n)

    def run(tensors, dims):
        kernel(tensors, dims)

    run.order_dependent = True
    return run


def test_check_and_time_deterministic_rejects_a_kernel_that_changes_its_last_bits(tmp_path):
    """Correct to every tolerance, but every other call flips the lowest bit of one output: the deterministic
    check's repeated runs on the same inputs see it; without the check the kernel passes."""
    w = hand_gemm_workload()
    code = hand_gemm(
        before="static int calls = 0;",
        store="if ((calls & 1) && m == 0 && n == 0) { uint32_t u; __builtin_memcpy(&u, &s, 4); u ^= 1u; "
              "__builtin_memcpy(&s, &u, 4); } out[m * N + n] = s;",
        after="calls++;",
    )
    so = str(build_ok(code, "scalar", tmp_path).so_path)
    loose = check_and_time({}, w, LOADER, (so, 3), EvalSettings(correctness_sets=2, timing_budget_ms=5))
    assert loose["stage"] == "ok", loose
    strict = check_and_time({}, w, LOADER, (so, 3), EvalSettings(correctness_sets=2, timing_budget_ms=5,
                                                                 deterministic=True))
    assert strict["stage"] == "nondeterministic" and not strict["correct"]
    assert "1 of" in strict["message"] and "'out'" in strict["message"]


def test_check_and_time_deterministic_passes_a_reproducible_kernel_and_refuses_declared_atomics(tmp_path):
    w = hand_gemm_workload()
    so = str(build_ok(hand_gemm(), "scalar", tmp_path).so_path)
    settings = EvalSettings(correctness_sets=2, timing_budget_ms=5, deterministic=True)
    assert check_and_time({}, w, LOADER, (so, 3), settings)["stage"] == "ok"
    flagged = "tests.evaluation.test_checks:order_dependent_loader"
    out = check_and_time({}, w, flagged, (so, 3), settings)
    assert out["stage"] == "nondeterministic" and "atomics" in out["message"]
    assert check_and_time({}, w, flagged, (so, 3), EvalSettings(correctness_sets=2, timing_budget_ms=5))["correct"]


def test_check_and_time_generated_attention(tmp_path):
    w = small("decode", "bf16")
    knobs = codegen.legalize(w, dict(online=True, kv_block=16), ["scalar"])
    so = build_ok(codegen.generate(w, knobs), "scalar", tmp_path).so_path
    out = check_and_time({}, w, LOADER, (str(so), len(w.tensors)), EvalSettings(correctness_sets=3, timing_budget_ms=5))
    assert out["stage"] == "ok", out


def test_cuda_timing_refuses_an_unknown_flush():
    from autocomp_compile.evaluation.checks import time_interleaved_cuda

    with pytest.raises(ValueError, match="flush"):
        time_interleaved_cuda({}, flush="evict")  # checked before any CUDA call: runs without a GPU
