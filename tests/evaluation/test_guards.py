"""Deliberately cheating kernels, one per reward-hacking family the evaluator must catch."""
from __future__ import annotations

import time

import torch

from autocomp_compile.agents.llm import ResponseRejected, extract_code
from autocomp_compile.evaluation.job import EvalSettings, check_and_time
from autocomp_compile.targets.cpu.evaluator import LOADER
from tests.helpers import build_ok, hand_gemm, hand_gemm_workload

import pytest

SETTINGS = EvalSettings(correctness_sets=2, timing_budget_ms=20)


def _run(code, tmp_path, settings=SETTINGS):
    w = hand_gemm_workload()
    so = build_ok(code, "scalar", tmp_path).so_path
    return check_and_time({}, w, LOADER, (str(so), len(w.tensors)), settings)


def _caught_while_timing(out) -> bool:
    """Failed by the check of a timed call picked at random or by the check after timing."""
    return out["stage"] == "correctness" and ("a timed call" in out["message"] or "after timing" in out["message"])


def test_an_honest_kernel_passes(tmp_path):
    assert _run(hand_gemm(), tmp_path)["stage"] == "ok"


def test_modifying_the_inputs(tmp_path):
    out = _run(hand_gemm(after="x[0] = 0.0f;"), tmp_path)
    assert out["stage"] == "inputs_modified"


def test_leaving_the_output_unwritten(tmp_path):
    """Output memory may still hold an earlier result; it is NaN-poisoned before every call."""
    out = _run(hand_gemm(store="if (n % 7) out[m * N + n] = s;"), tmp_path)
    assert out["stage"] == "correctness" and "non-finite" in out["message"]


def test_caching_results_by_input_pointer_during_timing(tmp_path):
    """Honest for the correctness calls, then returns the saved result whenever x sits at the same address:
    timed calls get new activation values at the same address, and the timed output is checked."""
    code = hand_gemm(
        before="static const void *last = 0; static float saved[M * N]; static int calls = 0;"
               "if (calls++ >= 2 && t[0] == last) { for (int i = 0; i < M * N; i++) out[i] = saved[i]; return; }"
               "last = t[0];",
        store="out[m * N + n] = s; saved[m * N + n] = s;",
    )
    out = _run(code, tmp_path)
    assert _caught_while_timing(out)


def test_caching_across_correctness_sets(tmp_path):
    code = hand_gemm(before="static float saved[M * N]; static int calls = 0;",
                     store="if (calls == 0) saved[m * N + n] = s; out[m * N + n] = saved[m * N + n];",
                     after="calls++;")
    assert _run(code, tmp_path)["stage"] == "correctness"


def cheating_loader(so_path: str, n: int):
    """A 'kernel' that computes correctly but swaps the harness's clock for one that barely moves."""
    from autocomp_compile.targets.cpu.runtime import CpuKernel

    real = CpuKernel(so_path, n)
    start = time.perf_counter()

    def kernel(tensors, dims):
        real(tensors, dims)
        time.perf_counter = lambda: start  # noqa: the cheat under test
    return kernel


def test_patching_the_timer(tmp_path):
    w = hand_gemm_workload()
    so = build_ok(hand_gemm(), "scalar", tmp_path).so_path
    real = time.perf_counter
    try:
        out = check_and_time({}, w, "tests.evaluation.test_guards:cheating_loader", (str(so), len(w.tensors)), SETTINGS)
    except ZeroDivisionError:  # the frozen clock may break the timing loop itself: also not a pass
        out = {"stage": "harness_modified"}
    finally:
        time.perf_counter = real
    assert out["stage"] == "harness_modified"


@pytest.mark.parametrize("call", ["dlopen(0, 0)", "system(\"true\")", "PyRun_SimpleString(\"x\")",
                                  "pthread_create(0, 0, 0, 0)"])
def test_calling_outside_the_kernel_is_rejected_before_compiling(call):
    code = "```c\nvoid autocomp_kernel(void **t, const int64_t *d) { " + call + "; }\n```"
    with pytest.raises(ResponseRejected):
        extract_code(code)


def test_refreshed_activations_change_between_calls():
    from autocomp_compile.evaluation.job import ActivationRefresher
    from autocomp_compile.workload import make_workload

    w = make_workload("mlp", "fp32", batch=1, hidden=64, intermediate=128)
    inputs = {s.name: torch.zeros(s.shape) for s in w.inputs}
    r = ActivationRefresher(w, inputs, seed=0)
    r()
    first = inputs["x"].clone()
    r()
    assert not torch.equal(first, inputs["x"]) and not inputs["w_gate"].any()  # weights are left alone


def test_doing_the_work_late(tmp_path):
    """Honest for the correctness calls, then each call returns the previous call's result (work deferred)."""
    code = hand_gemm(
        before="static float prev[M * N]; static int calls = 0; float cur[M * N];",
        store="cur[m * N + n] = s;",
        after="for (int i = 0; i < M * N; i++) { out[i] = calls >= 2 ? prev[i] : cur[i]; prev[i] = cur[i]; } calls++;",
    )
    out = _run(code, tmp_path)
    assert _caught_while_timing(out)


def test_a_speedup_beyond_the_roofline_is_not_trusted(tmp_path):
    w = hand_gemm_workload()
    so = build_ok(hand_gemm(), "scalar", tmp_path).so_path
    strict = EvalSettings(correctness_sets=1, timing_budget_ms=5, roofline_min_mb=0.0)
    flagged = check_and_time({"read_gbps": 1e-9}, w, LOADER, (str(so), len(w.tensors)), strict)
    assert flagged["stage"] == "beyond_roofline" and "not trusted" in flagged["message"]
    fine = check_and_time({"read_gbps": 1e6}, w, LOADER, (str(so), len(w.tensors)), strict)
    assert fine["stage"] == "ok"


def test_the_roofline_on_a_gpu_is_its_measured_hbm_read_bandwidth():
    """On CUDA the check uses the HBM read probe (cached per worker like the CPU's DRAM probe)."""
    from autocomp_compile.evaluation.job import _beyond_roofline
    from autocomp_compile.workload import make_workload

    w = make_workload("mlp", "bf16")  # 100 MB of weights
    cuda = EvalSettings(device="cuda:0")
    assert "above 2.5x the measured read bandwidth (3000.0 GB/s)" in _beyond_roofline(
        {"hbm_read_gbps": 3000.0}, w, 0.01, cuda)  # 10 TB/s
    assert _beyond_roofline({"hbm_read_gbps": 3000.0}, w, 0.05, cuda) == ""  # 2 TB/s: plausible
    both = {"read_gbps": 30.0, "hbm_read_gbps": 3000.0}  # each device consults its own probe
    assert _beyond_roofline(both, w, 0.05, cuda) == ""
    assert "(30.0 GB/s)" in _beyond_roofline(both, w, 0.5, EvalSettings())  # 200 GB/s from DRAM


@pytest.mark.parametrize("launch", ["child<<<1, 32, 0, cudaStreamFireAndForget>>>(out);",
                                    "cudaStream_t s; cudaStreamCreateWithFlags(&s, 1);",
                                    "cudaGraphLaunch(g, 0);"])
def test_cuda_work_outside_the_harness_stream_is_rejected(launch):
    """CUDA kernels are launched by the harness on PyTorch's stream; a candidate cannot pick a side stream
    from the host, and device-side launches (which would run outside the timed region) are refused."""
    src = ('// autocomp-launch: {"kernels":[{"name":"k","grid":[1,1,1],"block":[32,1,1],"args":["out"]}],"scratch":{}}\n'
           'extern "C" __global__ void k(float *out) { ' + launch + ' }\n')
    with pytest.raises(ResponseRejected):
        extract_code("```cuda\n" + src + "```", "cuda")
    honest = src.replace(launch, "out[threadIdx.x] = 0.0f;")
    assert extract_code("```cuda\n" + honest + "```", "cuda").startswith("// autocomp-launch")


def _gemm(code: str, tmp_path, m: int, n: int, k: int, settings=SETTINGS):
    from autocomp_compile.workload import make_workload

    w = make_workload("gemm", "fp32", m=m, n=n, k=k)
    p = dict(m=2, n=24, k=40)  # HAND_GEMM_SHAPE, which hand_gemm writes
    code = code.replace(f"#define M {p['m']}\n#define N {p['n']}\n#define K {p['k']}",
                        f"#define M {m}\n#define N {n}\n#define K {k}")
    so = build_ok(code, "scalar", tmp_path).so_path
    return check_and_time({}, w, LOADER, (str(so), len(w.tensors)), settings)


def test_skipping_the_work_once_the_result_is_in_the_output(tmp_path):
    """Honest until the timing starts, then returns at once, leaving the output of an earlier call. Every
    activation here is too large to refresh in full (40 x 2000): the smallest is refreshed anyway, and the
    timed output is poisoned again before the final check."""
    code = hand_gemm(before="static int calls = 0; if (calls++ >= 3) return;")
    out = _gemm(code, tmp_path, m=40, n=8, k=2000)
    assert _caught_while_timing(out)
    assert _gemm(hand_gemm(), tmp_path, m=40, n=8, k=2000)["stage"] == "ok"


@pytest.mark.parametrize("write, side", [("out[M * N] = 0.0f;", "after"), ("out[M * N + 15] = 1.0f;", "after"),
                                         ("out[-1] = 0.0f;", "before")])
def test_writing_past_the_output(tmp_path, write, side):
    out = _run(hand_gemm(after=write), tmp_path)
    assert out["stage"] == "out_of_bounds" and f"1 element(s) {side} output 'out'" in out["message"]


def test_writing_past_the_output_only_on_timed_calls(tmp_path):
    out = _run(hand_gemm(before="static int calls = 0;", after="if (calls++ >= 2) out[M * N] = 0.0f;"), tmp_path)
    assert out["stage"] == "out_of_bounds" and out["message"].startswith(("during timing", "a timed call"))


def thread_setting_loader(so_path: str, n: int):
    """A kernel that computes correctly, then sets the process's OpenMP thread count to 1 through libgomp (a
    compiled kernel calling omp_set_num_threads is refused at build, targets/cpu/linkage.py)."""
    import ctypes

    from autocomp_compile.targets.cpu.runtime import CpuKernel

    real, gomp = CpuKernel(so_path, n), ctypes.CDLL("libgomp.so.1")

    def kernel(tensors, dims):
        real(tensors, dims)
        gomp.omp_set_num_threads(1)
    return kernel


def test_changing_the_openmp_thread_count(tmp_path):
    """Torch and the kernels share one libgomp: a candidate's omp_set_num_threads(1) would leave every later
    candidate (and the baseline) timed on one thread."""
    w = hand_gemm_workload()
    so = build_ok(hand_gemm(), "scalar", tmp_path).so_path
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = check_and_time({}, w, "tests.evaluation.test_guards:thread_setting_loader", (str(so), len(w.tensors)),
                             SETTINGS)
        assert out["stage"] == "harness_modified" and "(2 -> 1)" in out["message"]
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)


def test_the_activation_refresh_is_not_timed():
    from autocomp_compile.evaluation.checks import time_interleaved

    t = time_interleaved({"a": lambda: None}, budget_ms=20, prepare={"a": lambda: time.sleep(0.002)})
    assert t["a"].median_ms < 1.0
    with pytest.raises(ValueError, match="not timed"):
        time_interleaved({"a": lambda: None}, prepare={"b": lambda: None})


def test_a_kernel_that_counts_its_calls_and_skips_the_timed_ones(tmp_path):
    """Right for the three correctness calls and for every call from the one after timing on (the call count is
    fixed when the runs hit their cap): before, only those were checked and it passed at ~27x. Now a few timed
    calls, picked at random, are checked too (and the warm-up length varies)."""
    settings = EvalSettings(correctness_sets=3, timing_budget_ms=1e6)  # runs capped at 200
    final_call = 3 + 2 + 1 + 200  # correctness, warm-up, estimate, timed runs
    out = _run(hand_gemm(before=f"static int calls = 0; if (calls++ >= 3 && calls <= {final_call}) return;"),
               tmp_path, settings)
    assert out["stage"] == "correctness" and "timed call" in out["message"]


def test_a_kernel_that_computes_only_into_nan_filled_outputs(tmp_path):
    """In a model the output buffer holds whatever it held: one correctness set and the check after timing give
    it finite values (before, every call found NaN there, and this passed)."""
    out = _run(hand_gemm(before="if (out[0] == out[0]) return;"), tmp_path)
    assert out["stage"] == "correctness"


def test_an_openmp_team_left_open_is_refused_at_link_time(tmp_path):
    """GOMP_parallel_start without its end leaves the harness thread in a parallel region: torch then runs on one
    thread while reporting two (the baseline slowed from 0.90 to 1.59 ms for every later candidate)."""
    from autocomp_compile.targets.cpu.compiler import build

    code = hand_gemm(before="extern void GOMP_parallel_start(void (*)(void *), void *, unsigned); "
                            "GOMP_parallel_start(0, 0, 1);")
    res = build(code, "scalar", tmp_path)
    assert not res.ok and "calls GOMP_parallel_start" in res.log
