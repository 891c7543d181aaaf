"""The memory read-bandwidth probe (targets/cpu/bandwidth.py): it reads every element of its buffer once."""
from __future__ import annotations

import torch

from autocomp_compile.targets.cpu.bandwidth import ReadProbe, measure_read_bandwidth


def test_the_probe_reads_every_element_once():
    probe = ReadProbe(megabytes=4)
    assert probe.nbytes == probe.n * 4 and probe.n % (8 * 4096) == 0
    probe.buf = torch.ones(probe.n)
    assert probe._lib.read_all(probe.buf.data_ptr(), probe.n) == probe.n  # exact in float: sums of 8-element blocks
    probe.buf[probe.n - 1] = 2.0  # the last element of the last stream counts too
    assert probe._lib.read_all(probe.buf.data_ptr(), probe.n) == probe.n + 1


def test_bandwidth_is_a_positive_rate():
    assert measure_read_bandwidth(megabytes=16, repeats=3) > 0.1
