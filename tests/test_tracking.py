"""--wandb: one run per searched workload, the best latency logged after every round, offline without a key."""
from __future__ import annotations

import sys
import types

from autocomp_compile import cli


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged = []
        self.finished = False

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self):
        self.finished = True


def test_wandb_logs_each_round_offline(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    argv = ["optimize", "--workload", "gemm", "--m", "1", "--n", "64", "--k", "64", "--dtype", "fp32", "--budget", "4",
            "--timing-ms", "10", "--no-cache", "--quiet", "--output-dir", str(tmp_path), "--wandb"]
    assert cli.main(argv) == 0
    (run,) = runs
    assert run.init["mode"] == "offline" and run.init["project"] == "autocomp-compile" and run.finished
    assert run.init["config"]["workload"]["kind"] == "gemm"
    steps = [step for step, _ in run.logged]
    assert steps == sorted(steps) and steps[-1] == 4
    assert all(m["best_latency_ms"] > 0 and "speedup_vs_eager" in m for _, m in run.logged)


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    argv = ["optimize", "--workload", "gemm", "--m", "1", "--n", "64", "--k", "64", "--budget", "2", "--no-cache",
            "--quiet", "--output-dir", str(tmp_path), "--wandb"]
    assert cli.main(argv) == 2
    assert "pip install wandb" in capsys.readouterr().err
