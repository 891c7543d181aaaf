"""optimize.py: schedule reuse seeds."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from autocomp_compile.optimize import reuse_seeds
from tests.conftest import FakeEvaluator, FakeTarget
from tests.helpers import small


def _entry(key, knobs):
    return SimpleNamespace(key=key, knobs=knobs, menu_ids=["m1"], workload={"params": {"m": 1}})


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
