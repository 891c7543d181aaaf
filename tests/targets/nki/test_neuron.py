"""The Neuron evaluator off a trn1: command construction and result parsing from recorded output.
Running kernels on a NeuronCore needs neuronx-cc and a device."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from autocomp_compile import make_workload
from autocomp_compile.targets.nki import neuron

W = make_workload("rmsnorm", hidden=512)

# What `python -m autocomp_compile.targets.nki.neuron run ...` prints on a trn1 (neuronx-cc logs, then our line).
RECORDED_RUN = """\
2026-11-27 10:01:02.000123:  12345  INFO ||NEURON_CC_WRAPPER||: Using a cached neff for kernel
.
Compiler status PASS
AUTOCOMP_RESULT {"correct": true, "stage": "ok", "max_abs_error": 0.0078125, "latency_ms": 0.00612, \
"latency_p99_ms": 0.00705, "runs": 100, "extra": {"device": "0"}}
"""
RECORDED_FAILURE = """\
AUTOCOMP_RESULT {"correct": false, "stage": "correctness", "message": "input set 0: out: at (0, 3) got 1.5, expected 0.25"}
"""


def test_commands():
    path = Path("/tmp/build/abc.py")
    sim = neuron.command("simulate", path, W, seed=7, sets=1, python="python3")
    assert sim[:5] == ["python3", "-m", "autocomp_compile.targets.nki.neuron", "simulate", str(path)]
    assert json.loads(sim[sim.index("--workload") + 1]) == json.loads(json.dumps(W.describe()))
    assert sim[sim.index("--seed") + 1] == "7" and "--iters" not in sim
    run = neuron.command("run", path, W, warmup=5, iters=50)
    assert run[0] == sys.executable and run[3] == "run"
    assert run[run.index("--warmup") + 1] == "5" and run[run.index("--iters") + 1] == "50"
    assert run[run.index("--neff") + 1] == "/tmp/build/abc.neff"
    with pytest.raises(ValueError):
        neuron.command("profile", path, W)


def test_parse_recorded_results():
    ok = neuron.parse_result(RECORDED_RUN)
    assert ok.correct and ok.stage == "ok" and ok.runs == 100
    assert ok.latency_ms == pytest.approx(0.00612) and ok.latency_p99_ms == pytest.approx(0.00705)
    assert ok.extra["simulated"] is False
    bad = neuron.parse_result(RECORDED_FAILURE)
    assert not bad.correct and bad.stage == "correctness" and "expected 0.25" in bad.message
    crash = neuron.parse_result("Segmentation fault\n", "core dumped", returncode=-11)
    assert not crash.correct and crash.stage == "crash" and "core dumped" in crash.stderr


@pytest.mark.skipif(not neuron.neuronxcc_version(), reason="needs neuronx-cc and a Trainium NeuronCore (trn1)")
def test_runs_on_a_neuroncore(tmp_path):  # pragma: no cover - runs only on a trn1 host
    from autocomp_compile import get_target

    target = get_target("nki")
    with target.make_evaluator(W, tmp_path) as ev:
        res = ev.evaluate([target.lower(W)])[0]
    assert res.correct and res.latency_ms > 0 and res.extra["simulated"] is False
