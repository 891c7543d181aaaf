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
