"""benchmarks/search_depth.py: both settings searched per seed, every winner re-timed, the table's counts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("search_depth", Path(__file__).parents[2] / "benchmarks" / "search_depth.py")
search_depth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(search_depth)


def test_summary_counts_winners_within_5pct_of_the_best():
    s = search_depth.summarize([1.0, 1.04, 1.2], [2.0, 1.9, 1.5], best_ms=1.0)
    assert s == {"median_ms": 1.04, "worst_ms": 1.2, "median_x_eager": 1.9, "worst_x_eager": 1.5, "within_5pct": 2}


def test_unknown_workload_is_an_error(capsys):
    with pytest.raises(SystemExit):
        search_depth.main(["--workloads", "mlp,conv"])
    assert "conv" in capsys.readouterr().err


def test_small_run_writes_both_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "depth.json"
    report = search_depth.main(["--budget", "6", "--seeds", "2", "--workloads", "mlp", "--timing-ms", "20",
                                "--shape", json.dumps({"hidden": 64, "intermediate": 96}), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    rows = report["workloads"]["mlp"]["by_min_depth"]
    assert set(rows) == {"1", "6"}
    winners = [ms for r in rows.values() for ms in r["winners_ms"]]
    assert len(winners) == 4 and all(ms > 0 for ms in winners)
    assert sum(r["within_5pct"] for r in rows.values()) >= 1  # the fastest winner is within 5% of itself
    assert all(len(r["iterations"]) == 2 and len(r["winners_menu_ids"]) == 2 for r in rows.values())
