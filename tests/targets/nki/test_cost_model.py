"""The trn1 cost model's engine formulas and its scheduling of dependencies."""
from __future__ import annotations

import pytest

from autocomp_compile.targets.nki import cost_model as cm
from autocomp_compile.targets.nki.emulator import Op


def test_engine_formulas():
    mm = Op("tensor", "matmul", partitions=128, free=512)
    assert cm.op_seconds(mm) == (pytest.approx((64 + 512) / 1.4e9), 0.0)
    assert cm.op_seconds(Op("tensor", "matmul", free=512, fp32=True))[0] == pytest.approx((64 + 4 * 512) / 1.4e9)
    assert cm.op_seconds(Op("vector", "add", partitions=1, free=2048))[0] == \
        cm.op_seconds(Op("vector", "add", partitions=128, free=2048))[0]
    full = cm.op_seconds(Op("dma", "load", bytes=1 << 20, chunk_bytes=4096))
    assert full == (pytest.approx((1 << 20) / 410e9), 2e-6)
    narrow = cm.op_seconds(Op("dma", "load", bytes=1 << 20, chunk_bytes=2))
    assert narrow[0] == pytest.approx(full[0] * 256)


def test_dependencies_and_barriers():
    def trace(barrier: bool) -> list[Op]:
        ops = []
        for i in range(3):
            ops.append(Op("dma", "load", bytes=4096, chunk_bytes=4096, writes=[10 + i], barrier=i if barrier else 0))
            ops.append(Op("vector", "exp", free=1000, reads=[10 + i], writes=[20 + i], barrier=i if barrier else 0))
        return ops

    overlapped, serial = cm.estimate(trace(False)), cm.estimate(trace(True))
    one_load = sum(cm.op_seconds(trace(False)[0])) * 1e6
    one_exp = cm.op_seconds(trace(False)[1])[0] * 1e6
    assert serial.latency_us == pytest.approx(3 * (one_load + one_exp))
    assert overlapped.latency_us < serial.latency_us
    assert overlapped.latency_us >= one_load + one_exp
    assert serial.to_dict()["simulated"] is True and serial.instructions == {"dma": 3, "vector": 3}
