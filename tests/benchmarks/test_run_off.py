"""benchmarks/run_off.py: searches with their run-off, repeated run-offs of the finalists, the tally."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("run_off", Path(__file__).parents[2] / "benchmarks" / "run_off.py")
run_off = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_off)


def test_tally_counts_each_repeats_fastest_and_medians():
    repeats = [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 2.5, "b": 2.0, "c": 3.0}, {"a": 1.5, "b": 2.0, "c": 0.5}]
    assert run_off.tally(["a", "b", "c"], repeats) == {
        "a": {"wins": 1, "median_ms": 1.5}, "b": {"wins": 1, "median_ms": 2.0}, "c": {"wins": 1, "median_ms": 3.0}}


def test_a_run_off_is_repeated_only_when_its_fastest_alone_and_winner_are_correct_finalists():
    ok = {"finalists": [{"id": "a", "wrong": None}, {"id": "b", "wrong": None}], "winner": "b", "fastest_alone": "a"}
    assert run_off.not_repeatable(ok) == ""
    assert run_off.not_repeatable(None) == "no run-off"
    assert run_off.not_repeatable({"error": "WorkerCrash", "finalists": ["a"]}) == "the run-off did not finish (WorkerCrash)"
    wrong_alone = {**ok, "finalists": [{"id": "a", "wrong": "mismatch"}, {"id": "b", "wrong": None}]}
    assert run_off.not_repeatable(wrong_alone) == "the fastest alone (a) is not a finalist found correct in the run-off"
    outside = {**ok, "finalists": [{"id": "a", "wrong": None}, {"id": "b", "wrong": "mismatch"}], "winner": "c"}
    assert run_off.not_repeatable(outside) == "the winner (c) is not a finalist found correct in the run-off"


def test_bad_options_are_errors(capsys):
    with pytest.raises(SystemExit):
        run_off.main(["--workloads", "mlp,conv"])
    assert "conv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_off.main(["--finalists", "1"])


def test_small_run_repeats_each_searchs_run_off(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run_off.json"
    report = run_off.main(["--budget", "6", "--seeds", "1", "--repeats", "2", "--workloads", "mlp", "--timing-ms", "20",
                           "--shape", json.dumps({"hidden": 64, "intermediate": 96}), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    (s,) = report["searches"]
    ids = [f["id"] for f in s["run_off"]["finalists"]]
    assert len(ids) == 3 and s["winner"] in ids and s["fastest_alone"] == ids[0]
    assert len(s["repeats"]) == 2 and all(set(r) == set(ids) and min(r.values()) > 0 for r in s["repeats"])
    assert sum(t["wins"] for t in s["tally"].values()) == 2
    assert s["alone_over_winner"] > 0 and s["alone_ms_over_repeats"] > 0
    assert report["summary"]["searches"] == 1 and report["summary"]["changed"] == int(s["changed"])
