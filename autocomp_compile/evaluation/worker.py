"""Run jobs in a separate process so that a kernel that crashes or hangs fails alone.

The worker is long-lived (it keeps its input pools and warm caches between candidates) and is
restarted after a crash or a timeout. Jobs are `module:function` names called with pickled args.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
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
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
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
