"""report.py: the line a search's run-off earns in the CLI's output."""
from __future__ import annotations

from autocomp_compile.report import run_off_line

FINALISTS = [{"id": "i4c00", "alone_ms": 3.315, "run_off_ms": 3.293, "runs": 200, "wrong": None},
             {"id": "i5c01", "alone_ms": 3.717, "run_off_ms": 3.090, "runs": 200, "wrong": None}]


def test_a_changed_winner_is_named_with_both_times():
    record = {"finalists": FINALISTS, "eager_ms": 7.5, "winner": "i5c01", "fastest_alone": "i4c00"}
    assert run_off_line("[4/5] mlp", record) == (
        "[4/5] mlp: the run-off of the 2 fastest picked i5c01 (3.090 ms there) over i4c00 (3.293 ms there, "
        "3.315 ms timed alone)")


def test_no_line_without_a_run_off_or_when_the_fastest_alone_won():
    assert run_off_line("mlp", None) is None
    assert run_off_line("mlp", {"finalists": FINALISTS, "eager_ms": 7.5, "winner": "i4c00",
                                "fastest_alone": "i4c00"}) is None


def test_a_run_off_that_did_not_finish_says_so_and_who_failed_again():
    record = {"error": "WorkerCrash: signal 11", "finalists": ["a", "b"], "failed_again": ["a"], "winner": "b"}
    assert run_off_line("gemm", record) == (
        "gemm: the run-off did not finish (WorkerCrash: signal 11); failed when evaluated again: a; winner b")
    record = {**record, "failed_again": []}
    assert run_off_line("gemm", record) == "gemm: the run-off did not finish (WorkerCrash: signal 11); winner b"


def test_finalists_wrong_in_the_run_off_are_named():
    wrong_first = [{**FINALISTS[0], "wrong": "at (0, 3) got 1.0, expected 2.0"}, FINALISTS[1]]
    record = {"finalists": wrong_first, "eager_ms": 7.5, "winner": "i5c01", "fastest_alone": "i4c00"}
    assert run_off_line("mlp", record) == (
        "mlp: the run-off of the 2 fastest found i4c00 wrong after timing and picked i5c01 (3.090 ms there)")
    all_wrong = [{**f, "wrong": "mismatch"} for f in FINALISTS]
    record = {"finalists": all_wrong, "eager_ms": 7.5, "winner": "i2c00", "fastest_alone": "i4c00"}
    assert run_off_line("mlp", record) == ("mlp: the run-off of the 2 fastest found i4c00, i5c01 wrong after timing; "
                                           "winner i2c00, the fastest of the others as timed alone")
    assert run_off_line("mlp", {**record, "winner": None}).endswith("; no correct kernel is left")
