"""optimize.py: schedule reuse seeds."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from autocomp_compile import EvalSettings, SearchConfig, optimize
from autocomp_compile.kernels_cache import KernelCache
from autocomp_compile.optimize import cache_hit, reuse_seeds
from autocomp_compile.targets.base import get_target
from tests.conftest import FakeEvaluator, FakeTarget
from tests.helpers import exported_cpu_kernel, small


def _entry(key, knobs):
    return SimpleNamespace(key=key, kind="gemm", knobs=knobs, menu_ids=["m1"], workload={"params": {"m": 1}})


def test_a_cached_schedule_that_does_not_legalise_is_skipped_with_a_warning(caplog):
    """An entry imported from another code-generator version may carry knobs of other types: it must not stop
    every later search of its kind."""
    target, w = FakeTarget(FakeEvaluator()), small("gemm")
    good = dict(isa="avx2", rows=4, threads="static")
    with caplog.at_level(logging.WARNING, logger="autocomp_compile.optimize"):
        seeds = reuse_seeds(target, w, [_entry("bad", {**good, "unroll": "auto"}), _entry("good", good),
                                        _entry("llm", None)])
    assert [s.origin for s in seeds] == ["reuse:good"]
    assert "skipping cached kernel bad" in caplog.text


def test_a_run_whose_model_calls_all_failed_searched_nothing_even_when_a_reuse_seed_won():
    from autocomp_compile.optimize import nothing_searched

    assert nothing_searched(calls=0, failures=3, best_iteration=0)  # the naive kernel or a reuse seed
    assert not nothing_searched(calls=0, failures=3, best_iteration=2)  # a menu proposer in the ensemble searched
    assert not nothing_searched(calls=1, failures=3, best_iteration=0)  # a model answered
    assert not nothing_searched(calls=0, failures=0, best_iteration=0)  # offline search, no models


def test_cache_hit_in_deterministic_mode_needs_a_reproducible_entry(tmp_path):
    """What the CLI shows as cached must be what optimize() returns without searching."""
    from autocomp_compile.evaluation.job import EvalSettings
    from autocomp_compile.kernels_cache import KernelCache
    from autocomp_compile.optimize import cache_hit
    from tests.kernels_cache.test_store import FakeTarget as StoreTarget, cand, gemm

    target, w = StoreTarget(), gemm()
    llm_written = cand("int a;", 1.0)
    llm_written.knobs = None  # no schedule, no repeat check: not known to be reproducible
    with KernelCache(tmp_path / "k.sqlite") as cache:
        cache.put(target, w, llm_written)
        assert cache_hit(cache, target, w, EvalSettings()) is not None
        assert cache_hit(cache, target, w, EvalSettings(deterministic=True)) is None
        cache.put(target, w, cand("int b;", 0.5))  # a generated schedule: reproducible
        assert cache_hit(cache, target, w, EvalSettings(deterministic=True)).code == "int b;"


def test_an_imported_wrong_kernel_is_checked_before_its_first_use_and_removed(tmp_path):
    """`cache import` cannot run code; the first use here does, and a wrong kernel is never served (it was a
    cache hit before, used without any check, and its claimed latency kept every search from replacing it)."""
    w, dst = exported_cpu_kernel(tmp_path, code_edit=("void autocomp_kernel(", "void unused_kernel("), latency=1e-6)
    assert "void autocomp_kernel(" not in dst.entries()[0].code  # the edit broke the kernel (no entry point)
    settings = EvalSettings(correctness_sets=1, timing_budget_ms=5)
    assert cache_hit(dst, get_target("cpu"), w, settings, check=False) is None  # not checkable: no hit
    assert cache_hit(dst, get_target("cpu"), w, settings) is None
    assert dst.entries() == []
    r = optimize(w, "cpu", SearchConfig(budget=2, seed=0), settings, output_dir=tmp_path / "runs2", cache=dst)
    assert r.stop_reason != "cache hit" and r.best is not None and not dst.entries()[0].unchecked


def test_an_imported_right_kernel_is_served_with_the_latency_measured_here(tmp_path):
    w, dst = exported_cpu_kernel(tmp_path, latency=1e-6)
    hit = cache_hit(dst, get_target("cpu"), w, EvalSettings(correctness_sets=1, timing_budget_ms=5))
    assert hit is not None and not hit.unchecked and hit.provenance["checked_here"]
    assert hit.latency_ms > 1e-6  # the file's claim is gone


class _Failing(FakeEvaluator):
    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def evaluate(self, candidates, on_result=None):
        from autocomp_compile.targets.base import EvalResult

        return [EvalResult.failure(self.stage, f"fake {self.stage}") for _ in candidates]


@pytest.mark.parametrize("stage, removed", [("timeout", False), ("beyond_roofline", False), ("correctness", True),
                                            ("crash", True), ("compile", True)])
def test_an_imported_kernel_is_removed_only_when_the_kernel_is_at_fault(tmp_path, stage, removed):
    from autocomp_compile.optimize import check_imported

    src = KernelCache(tmp_path / "a.sqlite")
    target, w = FakeTarget(FakeEvaluator()), small("gemm")
    cand = target.lower(w)
    cand.result = FakeEvaluator().evaluate([cand])[0]
    assert src.put(target, w, cand)
    src.export(tmp_path / "e.json")
    dst = KernelCache(tmp_path / "b.sqlite")
    dst.import_(tmp_path / "e.json", {"cpu": target.fingerprint()["codegen"]})
    failing = FakeTarget(_Failing(stage))
    assert check_imported(dst, failing, w, dst.get(failing, w), EvalSettings()) is None
    left = dst.entries()
    assert (left == []) == removed and all(e.unchecked for e in left)


def test_deterministic_mode_does_not_condemn_a_correct_imported_kernel(tmp_path):
    """The check is the normal one: a correct LLM-written kernel (never checked for reproducibility) stays cached
    for normal mode; deterministic mode just does not take it."""
    w, dst = exported_cpu_kernel(tmp_path)
    e = dst.entries()[0]
    dst.remove(e.key)
    e.knobs = None  # as an LLM-written kernel: not known to be reproducible
    dst._upsert(e)
    det = EvalSettings(correctness_sets=1, timing_budget_ms=5, deterministic=True)
    assert cache_hit(dst, get_target("cpu"), w, det) is None
    (left,) = dst.entries()
    assert not left.unchecked and not left.reproducible
    assert cache_hit(dst, get_target("cpu"), w, EvalSettings(correctness_sets=1, timing_budget_ms=5)) is not None
