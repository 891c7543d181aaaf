"""CpuKernel, the ctypes runtime of the CPU target, called from several Python threads at once."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

from autocomp_compile.references import empty_outputs
from autocomp_compile.targets.cpu import codegen
from autocomp_compile.targets.cpu.runtime import CpuKernel
from autocomp_compile.workload import make_workload
from tests.helpers import build_ok


@pytest.fixture
def frequent_thread_switches():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_threads_sharing_a_kernel_each_get_their_own_result(tmp_path, frequent_thread_switches):
    """ctypes releases the GIL during the call: a pointer array shared by every call of the kernel let one
    thread's call run on another's tensors (wrong outputs under a threaded server)."""
    w = make_workload("gemm", "fp32", m=2, n=64, k=64)
    kernel = CpuKernel(build_ok(codegen.generate(w, codegen.naive_knobs(w)), "scalar", tmp_path).so_path, len(w.tensors))
    weight = torch.randn(64, 64)
    inputs = [torch.randn(2, 64) * (t + 1) for t in range(4)]
    expected = []
    for x in inputs:
        out = empty_outputs(w)["out"]
        kernel([x, weight, out])
        expected.append(out)
    wrong: list[tuple[int, int]] = []

    def work(t: int) -> None:
        for i in range(400):
            out = torch.full_like(expected[t], float("nan"))
            kernel([inputs[t], weight, out])
            if not torch.equal(out, expected[t]):
                wrong.append((t, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not wrong, f"{len(wrong)} of 1600 calls got another thread's result"
