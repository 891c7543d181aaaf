"""The worker job's correctness checks: inputs stay unchanged through timing, and runtime dims vary per set."""
from __future__ import annotations

from pathlib import Path

import pytest

from autocomp_compile.evaluation.job import EvalSettings, check_and_time, correctness_dims, runtime_dim_max
from autocomp_compile.targets.cpu.evaluator import LOADER
from autocomp_compile.workload import Workload, make_workload
from tests.helpers import build_ok, decode_attention_code, hand_gemm, hand_gemm_workload, small

SETTINGS = EvalSettings(correctness_sets=3, timing_budget_ms=20, time_baseline=False)


def _check(w: Workload, code: str, isa: str, tmp_path: Path) -> dict:
    so = build_ok(code, isa, tmp_path).so_path
    return check_and_time({}, w, LOADER, (str(so), len(w.tensors)), SETTINGS)


def test_zeroing_a_weight_during_timing_is_caught(tmp_path):
    """Honest on the 3 correctness calls, then zeroes the weight and writes zeros: the reference computed from
    the zeroed inputs would be all zeros too, so only the snapshot catches it."""
    code = hand_gemm(before="static int calls = 0;"
                            "if (++calls > 3) { memset((void *)w, 0, sizeof(float) * N * K);"
                            " memset(out, 0, sizeof(float) * M * N); return; }")
    out = _check(hand_gemm_workload(), "#include <string.h>\n" + code, "scalar", tmp_path)
    assert out["stage"] == "inputs_modified" and out["message"] in (
        f"{when}: input 'w' was modified by the kernel" for when in ("after timing", "a timed call"))


def test_modifying_a_refreshed_activation_on_the_timed_call_is_caught(tmp_path):
    code = hand_gemm(before="static int calls = 0; calls++;", after="if (calls > 3) x[0] += 1.0f;")
    out = _check(hand_gemm_workload(), code, "scalar", tmp_path)
    assert out["stage"] == "inputs_modified" and "'x'" in out["message"]


def test_a_kernel_with_the_tuned_kv_length_baked_in_fails(tmp_path):
    w, code, isa = decode_attention_code(("const int64_t L = dims[0];", "const int64_t L = 37;"))
    out = _check(w, code, isa, tmp_path)
    assert out["stage"] == "correctness" and "input set 1 (kv_len=64)" in out["message"]


def test_a_generated_decode_kernel_passes_at_every_checked_kv_length(tmp_path):
    w, code, isa = decode_attention_code()
    assert _check(w, code, isa, tmp_path)["stage"] == "ok"


def test_cold_inputs_hold_twice_the_llc_in_copies_handed_out_in_turn():
    import torch

    from autocomp_compile.evaluation.job import ColdInputs
    from autocomp_compile.references import InputFactory

    w = small("decode")  # q, k_cache, v_cache: the caches stream from memory in a model, q is hot
    inputs = InputFactory(0).inputs(w)
    cache_bytes = 2 * inputs["k_cache"].numel() * inputs["k_cache"].element_size()
    cold = ColdInputs(w, inputs, llc_bytes=3 * cache_bytes)
    assert cold.names == ["k_cache", "v_cache"] and len(cold.sets) == 6  # 2 x LLC / bytes per call
    args = [inputs[t.name] for t in w.inputs] + [torch.empty(0)]
    feed = dict(inputs)
    swap, other = cold.bind(args), cold.bind(feed)
    seen = []
    for _ in range(6):  # the two bindings share one turn: candidate and baseline never read the same copy
        swap()
        other()
        seen += [args[1].data_ptr(), feed["k_cache"].data_ptr()]
    assert len(set(seen)) == 6 and seen[:6] == seen[6:]
    assert all(torch.equal(s["v_cache"], inputs["v_cache"]) for s in cold.sets)
    cold.use(args)
    assert args[1] is inputs["k_cache"] and args[0] is inputs["q"]
    assert ColdInputs(w, inputs, exclude=["k_cache"], llc_bytes=1).names == ["v_cache"]
    assert len(ColdInputs(w, inputs, llc_bytes=1 << 40).sets) == ColdInputs.MAX_COPIES


def test_timed_calls_read_a_weight_copy_the_last_call_did_not(tmp_path):
    w = hand_gemm_workload()
    log = tmp_path / "weights.log"
    settings = EvalSettings(correctness_sets=1, timing_budget_ms=20, time_baseline=True)
    out = check_and_time({}, w, "tests.helpers_worker:recording_gemm", (str(log),), settings)
    assert out["stage"] == "ok", out
    addresses = [int(a) for a in log.read_text().split()]
    timed = addresses[1:-1]  # the correctness call first, the check after timing last (on a copy)
    assert addresses[0] != addresses[-1] and len(set(timed)) > 1
    assert all(a != b for a, b in zip(timed, timed[1:]))


def test_a_kernel_that_works_only_for_buffers_it_was_checked_on_fails(tmp_path):
    """The timed calls read weight copies at other addresses; the check after timing runs on one of them, not on
    the originals the correctness calls used (a kernel skipping every unseen buffer passed at ~800x before)."""
    w = hand_gemm_workload()
    settings = EvalSettings(correctness_sets=3, timing_budget_ms=20, time_baseline=False)
    out = check_and_time({}, w, "tests.helpers_worker:pointer_trusting_gemm", (3,), settings)
    assert out["stage"] == "correctness" and out["message"].startswith(("after timing", "a timed call")), out


def test_every_timed_call_finds_its_output_poisoned(tmp_path):
    """Checked calls start from a NaN output; so must timed ones, or a kernel computing only on NaN is timed
    doing nothing (~30x at 2048x2048 before). One correctness set starts from finite values (a model's reused
    buffer), which such a kernel fails: with one set it reaches the timing, where every call finds NaN."""
    log = tmp_path / "calls.log"
    settings = EvalSettings(correctness_sets=1, timing_budget_ms=20, time_baseline=True)
    out = check_and_time({}, hand_gemm_workload(), "tests.helpers_worker:nan_checking_gemm", (str(log),), settings)
    calls = log.read_text().split()
    assert len(calls) > 10 and set(calls[:-1]) == {"real"}  # every call but the check after timing
    assert out["stage"] == "correctness" and out["message"].startswith("after timing")  # finite values there


def test_correctness_dims_start_at_the_tuned_value_then_cover_the_maximum_one_and_random_lengths():
    w = small("decode")  # kv_len 37, max_kv_len 64
    sets = correctness_dims(w, 6, seed=3)
    assert sets[:3] == [[37], [64], [1]] and all(1 <= d[0] <= 64 for d in sets)
    assert len({d[0] for d in sets[3:]}) > 1  # random, not one fixed value
    assert correctness_dims(w, 6, seed=3) == sets  # reproducible from the seed
    assert correctness_dims(w, 1, seed=3) == [[37]]
    assert correctness_dims(w, 2, seed=3) == [[37], [64]]  # the maximum before 1: clamping kernels fail first
    assert runtime_dim_max(w, "kv_len") == 64


def test_a_decode_kernel_that_clamps_to_its_tuned_length_fails_at_the_maximum(tmp_path):
    w, code, isa = decode_attention_code(("const int64_t L = dims[0];", "const int64_t L = dims[0] < 37 ? dims[0] : 37;"))
    out = _check(w, code, isa, tmp_path)
    assert out["stage"] == "correctness" and "(kv_len=64)" in out["message"]


def test_sets_repeating_an_earlier_one_are_left_out():
    w = make_workload("attention", "fp32", **{**small("decode").params, "kv_len": 64})  # tuned = maximum
    sets = correctness_dims(w, 4, seed=0)
    assert sets[:2] == [[64], [1]] and len(sets) == 4


@pytest.mark.parametrize("name", ["gemm", "prefill"])
def test_workloads_without_runtime_dims_get_none(name):
    assert correctness_dims(small(name), 3, seed=0) == [[], [], []]


def _nki_decode(edit: tuple[str, str] | None = None) -> tuple[Workload, str]:
    from autocomp_compile.targets.nki import codegen as nki_codegen

    w = make_workload("attention", heads=4, kv_heads=1, head_dim=64, kv_len=300, max_kv_len=512)
    code = nki_codegen.generate(w, nki_codegen.legalize(w, {}))
    if edit:
        assert edit[0] in code
        code = code.replace(*edit)
    return w, code


def test_the_nki_job_checks_other_kv_lengths_and_estimates_at_the_tuned_one():
    from autocomp_compile.targets.nki.evaluate import check_and_estimate

    w, code = _nki_decode()
    one, three = (check_and_estimate({}, w, "", (code,), EvalSettings(correctness_sets=n)) for n in (1, 3))
    assert one["stage"] == three["stage"] == "ok" and one["latency_ms"] == three["latency_ms"]
    w, baked = _nki_decode(("    NB = (kv_len", "    kv_len = 300\n    NB = (kv_len"))
    out = check_and_estimate({}, w, "", (baked,), EvalSettings(correctness_sets=3))
    assert out["stage"] == "correctness" and "(kv_len=512)" in out["message"]  # the maximum


def test_the_benchmark_times_every_variant_on_fresh_activations_and_checks_each_kernel(tmp_path):
    """benchmarks/kernels.py's job: a kernel that returns its first result again is no longer timed doing
    nothing (it was: the benchmark never changed the inputs and checked nothing)."""
    from autocomp_compile.evaluation.job import time_functions
    from autocomp_compile.targets.cpu.evaluator import LOADER

    w = hand_gemm_workload()
    honest = build_ok(hand_gemm(), "scalar", tmp_path / "a").so_path
    out = time_functions({}, w, {"autocomp": (LOADER, (str(honest), len(w.tensors)))}, 20, True, False)
    assert set(out) == {"autocomp", "eager"} and out["autocomp"]["runs"] >= 5
    replaying = build_ok(hand_gemm(before="static float saved[M * N]; static int calls = 0;"
                                          "if (calls++) { for (int i = 0; i < M * N; i++) out[i] = saved[i]; return; }",
                                   store="out[m * N + n] = s; saved[m * N + n] = s;"), "scalar", tmp_path / "b").so_path
    with pytest.raises(RuntimeError, match="autocomp computed a wrong result in the benchmark"):
        time_functions({}, w, {"autocomp": (LOADER, (str(replaying), len(w.tensors)))}, 20, True, False)
