"""Job functions run inside `IsolatedWorker` by tests/evaluation/test_worker.py.

The worker imports this module as `tests.helpers_worker`; the repository root must be on its
PYTHONPATH (tests/conftest.py sets it).
"""
from __future__ import annotations

import ctypes
import os
import time


def echo(state, value):
    return value


def count(state):
    """State persists between jobs in one worker process; a restart resets it."""
    state["n"] = state.get("n", 0) + 1
    return state["n"]


def pid(state):
    return os.getpid()


def env(state, name):
    return os.environ.get(name)


def fail(state, message):
    raise ValueError(message)


def abort(state):
    os.abort()


def segfault(state):
    ctypes.string_at(0)  # read from NULL


def hard_exit(state, code):
    os._exit(code)


def sleep(state, seconds):
    time.sleep(seconds)
    return "woke up"


def unpicklable(state):
    return lambda: None


def recording_gemm(log_path):
    """A GEMM 'kernel' (torch, out = x @ w^T) that appends the address of each weight it is given to `log_path`."""
    import torch

    def run(tensors, dims):
        x, w, out = tensors
        with open(log_path, "a") as f:
            f.write(f"{w.data_ptr()}\n")
        torch.matmul(x, w.t(), out=out)

    return run


def pointer_trusting_gemm(checked_calls):
    """A GEMM 'kernel' that computes only for weight buffers seen in its first `checked_calls` calls (the
    correctness sets) and returns at once for any other (the timed calls' weight copies)."""
    import torch

    trusted, calls = set(), [0]

    def run(tensors, dims):
        x, w, out = tensors
        calls[0] += 1
        if calls[0] <= checked_calls:
            trusted.add(w.data_ptr())
        if w.data_ptr() in trusted:
            torch.matmul(x, w.t(), out=out)

    return run


def nan_checking_gemm(log_path):
    """A GEMM 'kernel' that computes only when its output starts poisoned (NaN), as before a checked call, and
    logs 'real' or 'skip' for each call to `log_path`."""
    import torch

    def run(tensors, dims):
        x, w, out = tensors
        fresh = bool(out.view(-1)[0].isnan())
        with open(log_path, "a") as f:
            f.write("real\n" if fresh else "skip\n")
        if fresh:
            torch.matmul(x, w.t(), out=out)

    return run
