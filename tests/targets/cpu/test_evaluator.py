"""CpuEvaluator guards (targets/cpu/evaluator.py + evaluation/job.py) with deliberately bad kernels.

Hand-written kernels use the ABI `void autocomp_kernel(void **t, const int64_t *dims)` on an fp32
GEMM (tests/helpers.py: hand_gemm). One evaluator (one worker process) is shared by the module.
"""
from __future__ import annotations

import pytest

from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.cpu.evaluator import CpuEvaluator
from autocomp_compile.targets.cpu.target import CpuTarget
from tests.helpers import hand_gemm, hand_gemm_workload, small

TIMEOUT_S = 10.0  # the worker imports torch when it (re)starts: ~2 s here


def cand(code: str, name: str = "c") -> Candidate:
    return Candidate(id=name, parent_id=None, iteration=0, language="c", code=code, knobs={"isa": "scalar"})


BAD = {
    "correct": hand_gemm(),
    "zeros": hand_gemm(store="out[m * N + n] = 0.0f; (void)s;"),
    "copies_input": hand_gemm(store="out[m * N + n] = x[(m * N + n) % (M * K)]; (void)s;"),
    "partial_output": hand_gemm(n_end="N - 1"),
    "modifies_input": hand_gemm(after="x[3] += 1.0f;"),
    "no_entry_point": "int something_else(void) { return 1; }\n",
    "stops_after_two_calls": hand_gemm(before="static int calls = 0; if (++calls > 2) return;"),
    "compile_error": hand_gemm(store="out[m * N + n] = s + undefined_symbol_xyz;"),
    "correct_again": hand_gemm(after="/* same computation, different object */ (void)0;"),
}


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    settings = EvalSettings(correctness_sets=2, timing_budget_ms=20, timeout_s=TIMEOUT_S)
    ev = CpuEvaluator(hand_gemm_workload(), tmp_path_factory.mktemp("eval_build"), settings, build_workers=2)
    yield ev
    ev.close()


@pytest.fixture(scope="module")
def bad_results(evaluator):
    """All guard kernels in ONE evaluate() call: one failure must never stop the others."""
    names = list(BAD)
    results = evaluator.evaluate([cand(BAD[n], n) for n in names])
    assert len(results) == len(names)
    return dict(zip(names, results))


def _assert_ok(r):
    assert r.correct and r.stage == "ok", (r.stage, r.message, r.stderr)
    assert r.latency_ms is not None and r.latency_ms > 0
    assert r.latency_p99_ms is not None and r.latency_p99_ms >= r.latency_ms
    assert r.baseline_ms is not None and r.baseline_ms > 0
    assert r.runs >= 5
    assert r.compile_s is not None
    assert r.max_abs_error is not None and r.max_abs_error < 1e-3


def test_correct_kernel_is_ok(bad_results):
    _assert_ok(bad_results["correct"])
    _assert_ok(bad_results["correct_again"])  # after every kind of failure in the same batch


@pytest.mark.parametrize("name", ["zeros", "copies_input"])
def test_wrong_kernel_fails_correctness(bad_results, name):
    r = bad_results[name]
    assert not r.correct and r.stage == "correctness"
    assert "input set 0" in r.message and "expected" in r.message
    assert r.max_abs_error is not None and r.max_abs_error > 0.1
    assert r.latency_ms is None


def test_unwritten_output_is_caught_by_nan_poisoning(bad_results):
    r = bad_results["partial_output"]
    assert not r.correct and r.stage == "correctness"
    assert "non-finite" in r.message and "(0, 23)" in r.message  # first unwritten element: last column


def test_kernel_modifying_its_input(bad_results):
    r = bad_results["modifies_input"]
    assert not r.correct and r.stage == "inputs_modified"
    assert "'x'" in r.message


def test_missing_entry_point_is_a_load_failure(bad_results):
    r = bad_results["no_entry_point"]
    assert not r.correct and r.stage == "load"
    assert "autocomp_kernel" in r.message


def test_output_checked_again_after_timing(bad_results):
    """Correct on the checked calls, then stops writing: the timed calls' output is checked too (a timed call
    picked at random, or the call after timing)."""
    r = bad_results["stops_after_two_calls"]
    assert not r.correct and r.stage == "correctness"
    assert r.message.startswith(("after timing", "a timed call"))


def test_compile_error(bad_results):
    r = bad_results["compile_error"]
    assert not r.correct and r.stage == "compile"
    assert "undefined_symbol_xyz" in r.stderr and "error" in r.stderr
    assert r.compile_s is not None and r.compile_s > 0


def test_segfault_is_a_crash_and_next_candidate_still_runs(evaluator):
    crash = hand_gemm(before="*(volatile int *)0 = 1;")
    results = evaluator.evaluate([cand(crash, "segv"), cand(BAD["correct"], "after_crash")])
    assert results[0].stage == "crash" and not results[0].correct
    assert "signal 11" in results[0].message
    _assert_ok(results[1])


def test_abort_in_kernel_is_a_crash(evaluator):
    code = "#include <stdlib.h>\n" + hand_gemm(before="abort();")
    reported = []
    results = evaluator.evaluate([cand(BAD["compile_error"], "no_build"), cand(code, "abort"), cand(BAD["correct"], "ok")],
                                 on_result=lambda i, res: reported.append((i, res)))
    _, r, ok = results
    assert r.stage == "crash" and "signal 6" in r.message
    _assert_ok(ok)
    # each result reported as it is known (the search saves it then), in order, the compile failure included
    assert [(i, res.stage) for i, res in reported] == [(0, "compile"), (1, "crash"), (2, "ok")]
    assert [res for _, res in reported] == results


def test_infinite_loop_times_out_and_next_candidate_still_runs(evaluator):
    # Slow by design: the hung candidate costs TIMEOUT_S (10 s) of wall time.
    spin = hand_gemm(before="volatile int spin = 1; while (spin) { }")
    results = evaluator.evaluate([cand(spin, "spin"), cand(BAD["correct"], "after_timeout")])
    assert results[0].stage == "timeout" and not results[0].correct
    assert f"{TIMEOUT_S:.0f} s" in results[0].message
    _assert_ok(results[1])


def test_generated_kernels_through_target_evaluator(tmp_path, monkeypatch):
    """The real path: CpuTarget.lower + make_evaluator, builds land in $AUTOCOMP_CACHE_DIR."""
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))
    target = CpuTarget()
    w = small("mlp_b2_odd", "bf16")
    root = target.lower(w)
    fast = target.legalize(w, dict(isa=target.isas[-1], rows=4, unroll=2, fuse=True, threads="static"))
    child = Candidate(id="fast", parent_id="root", iteration=1, language="c", code=target.generate(w, fast), knobs=fast)
    ev = target.make_evaluator(w, settings=EvalSettings(correctness_sets=2, timing_budget_ms=20, timeout_s=60))
    try:
        results = ev.evaluate([root, child])
    finally:
        ev.close()
    for r in results:
        assert r.correct and r.stage == "ok", (r.stage, r.message, r.stderr)
        assert r.latency_ms > 0 and r.baseline_ms > 0
        assert r.max_abs_error < 0.5
    assert list((tmp_path / "cache" / "build" / "cpu").glob("k_*.so"))


# ---------------------------------------------------------------- the run-off (evaluator.run_off)

REPLAYS_FIRST_RESULT = hand_gemm(before="static float saved[M * N]; static int calls = 0;"
                                        "if (calls++) { for (int i = 0; i < M * N; i++) out[i] = saved[i]; return; }",
                                 store="out[m * N + n] = s; saved[m * N + n] = s;")


def test_the_run_off_times_finalists_together_with_eager_and_names_the_wrong_ones(evaluator):
    """Correct kernels get timings in one loop with eager; a kernel that returns its first result again is
    reported wrong (the checked output after timing), not raised: the search fails it and goes on."""
    finalists = [cand(BAD["correct"], "a"), cand(BAD["correct_again"], "b"), cand(REPLAYS_FIRST_RESULT, "replays")]
    out = evaluator.run_off(finalists)
    assert set(out["timing"]) == {c.code_hash for c in finalists} | {"eager"}
    assert all(t["median_ms"] > 0 and t["runs"] >= 5 for t in out["timing"].values())
    assert list(out["wrong"]) == [finalists[2].code_hash] and "expected" in out["wrong"][finalists[2].code_hash]


def test_a_run_off_whose_worker_crashes_raises_and_the_evaluator_goes_on(evaluator):
    from autocomp_compile.targets.base import RunOffError

    crash = hand_gemm(before="static int calls = 0; if (++calls > 3) *(volatile int *)0 = 1;")
    with pytest.raises(RunOffError, match="WorkerCrash"):
        evaluator.run_off([cand(BAD["correct"], "a"), cand(crash, "crashes_when_timed")])
    _assert_ok(evaluator.evaluate([cand(BAD["correct"], "after_run_off")])[0])


def test_an_evaluator_without_a_run_off_job_has_no_run_off(tmp_path):
    class Estimates(CpuEvaluator):
        run_off_job = None

    ev = Estimates(hand_gemm_workload(), tmp_path, EvalSettings(timing_budget_ms=20, timeout_s=TIMEOUT_S))
    try:
        assert ev.run_off([cand(BAD["correct"], "a"), cand(BAD["correct_again"], "b")]) is None
    finally:
        ev.close()
