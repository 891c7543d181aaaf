"""Run jobs in a separate process so that a kernel that crashes or hangs fails alone.

The worker is long-lived (it keeps its input pools and warm caches between candidates) and is
restarted after a crash or a timeout. Jobs are `module:function` names called with pickled args.

Starting one costs seconds (a fresh interpreter importing torch), so a search's evaluator takes an idle worker
that an earlier search left (`acquire_worker`), its state cleared, and hands it back when done (`release_worker`).
"""
from __future__ import annotations

import atexit
import importlib
import os
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any


class WorkerCrash(RuntimeError):
    """The worker died while running a job (segfault, abort, out of memory)."""


class WorkerTimeout(RuntimeError):
    """The job ran past its time limit; the worker was killed."""


def _serve(conn: "_Duplex") -> None:
    state: dict[str, Any] = {}  # survives between jobs: input pools, loaded baselines
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn_path, args = job
        try:
            module, name = fn_path.split(":")
            fn = getattr(importlib.import_module(module), name)
            conn.send(("ok", fn(state, *args)))
        except BaseException as exc:  # report everything, including KeyboardInterrupt in the job
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"))


def main(read_fd: int, write_fd: int) -> None:
    """Entry point of the worker process (started by `IsolatedWorker`)."""
    _serve(_Duplex(Connection(read_fd, writable=False), Connection(write_fd, readable=False)))


class _Duplex:
    """Two one-way pipe connections used as one."""

    def __init__(self, rx: Connection, tx: Connection):
        self.rx, self.tx = rx, tx

    def recv(self) -> Any:
        return self.rx.recv()

    def send(self, obj: Any) -> None:
        self.tx.send(obj)

    def poll(self, timeout: float) -> bool:
        return self.rx.poll(timeout)

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


class IsolatedWorker:
    """One worker process; `run(fn_path, *args, timeout_s=...)` returns the job's result.

    The worker is a fresh interpreter (`python -c ...`), not a multiprocessing child, so user
    scripts need no `if __name__ == "__main__"` guard and notebooks work.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._conn: _Duplex | None = None
        self._busy = False  # a job was sent and its result not received (the run was interrupted)

    def start(self) -> None:
        """Start the process now (it imports torch while the caller goes on), unless it is running."""
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()

    def healthy(self) -> bool:
        """Running, and not in the middle of a job whose result was never received."""
        return self._proc is not None and self._proc.poll() is None and not self._busy

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        # Ctrl-C reaches the whole process group: the worker ignores it (it would print a KeyboardInterrupt
        # traceback of its own) and the parent stops it (the evaluator's close() runs in a finally)
        code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                f"from autocomp_compile.evaluation.worker import main; main({to_child_r}, {to_parent_w})")
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child_r, to_parent_w))
        os.close(to_child_r)
        os.close(to_parent_w)
        self._conn = _Duplex(Connection(to_parent_r, writable=False), Connection(to_child_w, readable=False))

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._busy = False

    def run(self, fn_path: str, *args: Any, timeout_s: float = 120.0) -> Any:
        """Run `fn_path(state, *args)` in the worker. Raises WorkerCrash, WorkerTimeout or RuntimeError."""
        self.start()
        assert self._conn is not None and self._proc is not None
        self._busy = True
        self._conn.send((fn_path, args))
        if not self._conn.poll(timeout_s):
            self._kill()
            raise WorkerTimeout(f"no result after {timeout_s:.0f} s; worker killed")
        try:
            status, payload = self._conn.recv()
            self._busy = False
        except (EOFError, ConnectionResetError, OSError):
            code = self._proc.wait(5)
            self._kill()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise WorkerCrash(f"worker process died ({how})") from None
        if status == "error":
            raise RuntimeError(payload)
        return payload

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and not self._busy:
            try:
                self._conn.send(None)
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def __enter__(self) -> "IsolatedWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _clear_state(state: dict[str, Any]) -> None:
    state.clear()


_CLEAR_STATE = f"{__name__}:_clear_state"
_idle: list[IsolatedWorker] = []  # at most one, kept between searches
_idle_lock = threading.Lock()


def acquire_worker() -> IsolatedWorker:
    """The idle worker an earlier search released (running, its state empty), else a new one (not started)."""
    with _idle_lock:
        worker = _idle.pop() if _idle else None
    if worker is not None and worker.healthy():
        return worker
    if worker is not None:
        worker.close()
    return IsolatedWorker()


def release_worker(worker: IsolatedWorker) -> None:
    """Keep `worker` for the next search (its state cleared: input pools, cold copies) when it is healthy and no
    other worker is kept; else stop it."""
    if worker.healthy():
        try:
            worker.run(_CLEAR_STATE, timeout_s=30.0)
        except RuntimeError:  # WorkerCrash, WorkerTimeout: it stopped, or was stopped
            worker.close()
            return
        with _idle_lock:
            if not _idle:
                _idle.append(worker)
                return
    worker.close()


@atexit.register
def _close_idle() -> None:
    with _idle_lock:
        while _idle:
            _idle.pop().close()
