"""IsolatedWorker (evaluation/worker.py): a job that raises, crashes or hangs fails alone.

Jobs live in tests/helpers_worker.py; the worker is a fresh `python -c` interpreter that inherits
PYTHONPATH (set to the repository root by tests/conftest.py), so it can import `tests.helpers_worker`.
"""
from __future__ import annotations

import os

import pytest

from autocomp_compile.evaluation.worker import IsolatedWorker, WorkerCrash, WorkerTimeout

H = "tests.helpers_worker"


@pytest.fixture
def worker():
    w = IsolatedWorker()
    yield w
    w.close()


def test_runs_jobs_and_keeps_state(worker):
    assert worker.run(f"{H}:echo", {"a": [1, 2.5, "x"]}) == {"a": [1, 2.5, "x"]}
    assert worker.run(f"{H}:count") == 1
    assert worker.run(f"{H}:count") == 2  # same process, state kept
    assert worker.run(f"{H}:pid") != os.getpid()


def test_worker_inherits_environment(worker, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_TEST_MARKER", "hello-worker")
    assert worker.run(f"{H}:env", "AUTOCOMP_TEST_MARKER") == "hello-worker"


def test_exception_in_job_is_reported_and_worker_survives(worker):
    first_pid = worker.run(f"{H}:pid")
    worker.run(f"{H}:count")
    with pytest.raises(RuntimeError, match="ValueError: the message 123") as info:
        worker.run(f"{H}:fail", "the message 123")
    assert not isinstance(info.value, (WorkerCrash, WorkerTimeout))
    assert "helpers_worker.py" in str(info.value)  # traceback included
    assert worker.run(f"{H}:pid") == first_pid
    assert worker.run(f"{H}:count") == 2  # state survived the exception


def test_unknown_job_is_an_error_not_a_crash(worker):
    with pytest.raises(RuntimeError, match="ModuleNotFoundError"):
        worker.run("no_such_module_xyz:fn")
    with pytest.raises(RuntimeError, match="AttributeError"):
        worker.run(f"{H}:no_such_function")
    assert worker.run(f"{H}:echo", 5) == 5


@pytest.mark.parametrize(
    "job, args, how",
    [("abort", (), "signal 6"), ("segfault", (), "signal 11"), ("hard_exit", (3,), "exit code 3")],
)
def test_crash_raises_worker_crash_and_worker_restarts(worker, job, args, how):
    before = worker.run(f"{H}:pid")
    worker.run(f"{H}:count")
    with pytest.raises(WorkerCrash, match=how):
        worker.run(f"{H}:{job}", *args)
    after = worker.run(f"{H}:pid")
    assert after != before  # a fresh process ...
    assert worker.run(f"{H}:count") == 1  # ... with fresh state


def test_timeout_kills_worker_and_next_job_runs(worker):
    worker.run(f"{H}:echo", 0)  # warm start, so the timeout covers only the job
    pid = worker.run(f"{H}:pid")
    with pytest.raises(WorkerTimeout, match="no result after 1 s"):
        worker.run(f"{H}:sleep", 60, timeout_s=1.0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert worker.run(f"{H}:sleep", 0.01, timeout_s=30) == "woke up"


def test_close_stops_the_process_and_is_reusable():
    w = IsolatedWorker()
    pid = w.run(f"{H}:pid")
    w.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    w.close()  # idempotent
    with w:
        assert w.run(f"{H}:echo", "again") == "again"
    assert w._proc is None


def test_ctrl_c_reaches_the_parent_not_the_worker(worker):
    """The terminal sends SIGINT to the whole process group: the worker finishes its job quietly, and a parent
    interrupted in the middle of a job stops the worker at once on close()."""
    import signal
    import threading
    import time

    pid = worker.run(f"{H}:pid")
    threading.Timer(0.3, os.kill, (pid, signal.SIGINT)).start()
    assert worker.run(f"{H}:sleep", 1.0) == "woke up"  # no KeyboardInterrupt in the job
    assert worker.run(f"{H}:pid") == pid  # the same worker: it was not killed by the signal
    # to the main thread, as the terminal's SIGINT: raise_signal() in the timer's thread would reach the main
    # thread only when its 30 s wait for the job ended
    threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        worker.run(f"{H}:sleep", 30.0)
    assert time.perf_counter() - t0 < 10.0  # interrupted in the middle of the job
    t0 = time.perf_counter()
    worker.close()
    assert time.perf_counter() - t0 < 2.0  # killed, not waited for (close() waits up to 5 s for an idle worker)


def test_a_released_worker_serves_the_next_search_with_empty_state():
    from autocomp_compile.evaluation.worker import acquire_worker, release_worker

    first = acquire_worker()
    first.run(f"{H}:count")
    pid = first.run(f"{H}:pid")
    release_worker(first)
    second = acquire_worker()
    try:
        assert second is first and second.run(f"{H}:pid") == pid  # no new interpreter to start
        assert second.run(f"{H}:count") == 1  # the earlier search's state is gone
        other = acquire_worker()  # none idle now: a new worker, not the one in use
        assert other is not second
        release_worker(other)  # never started: nothing to keep
        assert acquire_worker() is not second
    finally:
        second.close()


def test_a_worker_interrupted_in_a_job_is_not_kept():
    import signal
    import threading

    from autocomp_compile.evaluation.worker import acquire_worker, release_worker

    w = acquire_worker()
    pid = w.run(f"{H}:pid")
    threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        w.run(f"{H}:sleep", 30.0)
    release_worker(w)  # busy with a job nobody waits for: stopped
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    fresh = acquire_worker()
    assert fresh is not w
    fresh.close()


def test_an_evaluator_closed_twice_does_not_stop_the_worker_another_search_holds(tmp_path):
    from autocomp_compile.targets.cpu.evaluator import CpuEvaluator
    from autocomp_compile.workload import make_workload

    w = make_workload("gemm", "fp32", m=1, n=8, k=16)
    first = CpuEvaluator(w, tmp_path)
    worker = first._worker
    pid = worker.run(f"{H}:pid")
    first.close()
    second = CpuEvaluator(w, tmp_path)
    try:
        assert second._worker is worker
        first.close()  # again: its worker went to `second`, which keeps it
        assert second._worker.run(f"{H}:pid") == pid
    finally:
        second.close()
