"""benchmarks/schedules.py: given schedules legalised, checked and timed against eager; bad input refused."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from autocomp_compile import get_target, make_workload

_spec = importlib.util.spec_from_file_location("schedules", Path(__file__).parents[2] / "benchmarks" / "schedules.py")
schedules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(schedules)


def test_compare_times_every_schedule_and_eager_and_reports_what_ran():
    cpu = get_target("cpu")
    w = make_workload("gemm", "fp32", m=12, n=40, k=64)
    given = {"naive": {}, "packed": {"isa": cpu.isas[-1], "pack": 1, "pack_rows": 4, "threads": "static"}}
    r = schedules.compare(cpu, w, given, rounds=2, timing_ms=30)
    assert set(r["median_ms"]) == {"naive", "packed", "eager"} and all(t > 0 for t in r["median_ms"].values())
    assert len(r["runs"]) == 2 and r["flops"] == 2 * 12 * 40 * 64
    assert r["legal_knobs"]["naive"]["isa"] == "scalar"
    assert r["legal_knobs"]["packed"]["pack"] == (1 if cpu.isas[-1] != "scalar" else 0)  # legalised for this host


@pytest.mark.parametrize("text, why", [("packed", "LABEL=JSON"), ("=x", "LABEL=JSON"), ("a={", "not JSON"),
                                       ("a=[1]", "JSON object")])
def test_a_malformed_schedule_is_refused(text, why):
    with pytest.raises(SystemExit, match=why):
        schedules.parse_schedule(text)
    assert schedules.parse_schedule('b={"pack": 2}') == ("b", {"pack": 2})
