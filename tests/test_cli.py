"""The `autocomp-compile` command: one-line errors with exit status 2, targets listing, a real run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autocomp_compile import cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "--workload", "conv2d"], "unknown workload 'conv2d'"),
        (["optimize", "--workload", "gemm", "--target", "tpu"], "unknown target 'tpu'"),
        (["optimize", "--workload", "gemm", "--dtype", "fp16"], "unknown dtype 'fp16'"),
        (["optimize", "--workload", "gemm", "--m", "-3"], "m must be a positive integer"),
        (["optimize", "--workload", "mlp", "--vocab", "5"], "unknown parameter(s) ['vocab']"),
        (["optimize", "--workload", "attention", "--heads", "6", "--kv-heads", "4"], "multiple of kv_heads"),
        (["optimize", "--workload", "attention", "--kv-len", "4096", "--max-kv-len", "2048"], "exceeds max_kv_len"),
        (["optimize", "--workload", "attention", "--phase", "train"], "phase must be"),
        (["optimize", "--workload", "gemm", "--budget", "0"], "budget must be >= 1"),
        (["optimize", "--workload", "gemm", "--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["optimize", "--workload", "gemm", "--sets", "0"], "--sets must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autocomp-compile: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_unavailable_target_says_why(capsys, monkeypatch):
    from autocomp_compile.targets.cuda.target import CudaTarget

    monkeypatch.setattr(CudaTarget, "available", lambda self: (False, "no CUDA GPU visible to torch"))
    assert cli.main(["optimize", "--workload", "gemm", "--target", "cuda"]) == 2
    assert "not available here: no CUDA GPU visible" in capsys.readouterr().err


def test_targets_lists_every_target(capsys):
    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu    available")
    assert "\ncuda " in out and ("unavailable:" in out or "available:" in out)


def test_run_conflict_is_reported(tmp_path, capsys):
    run = tmp_path / "out" / "mine"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"something": "else"}')
    argv = ["optimize", "--workload", "gemm", "--m", "1", "--n", "8", "--k", "16", "--output-dir", str(tmp_path / "out"),
            "--run-name", "mine", "--quiet"]
    assert cli.main(argv) == 2
    assert "different settings" in capsys.readouterr().err


def test_optimize_writes_the_json_the_issue_names(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "autocomp_compile.cli", "optimize", "--workload", "gemm", "--m", "1", "--n", "64",
         "--k", "128", "--budget", "4", "--timing-ms", "20", "--output-dir", str(tmp_path / "out"), "--json", str(out),
         "--quiet"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for key in ("baseline_ms", "best_ms", "speedup", "correct", "candidates_evaluated", "naive_ms",
                "achieved_gbps", "percent_of_read_bw", "read_gbps"):
        assert key in data, key
    assert data["correct"] is True and 1 <= data["candidates_evaluated"] <= 4
    assert data["speedup"] == pytest.approx(data["baseline_ms"] / data["best_ms"])
    assert "best ms" in proc.stdout and "gemm" in proc.stdout  # the results table


def test_deterministic_flag_runs_the_repeat_check_in_its_own_run(tmp_path):
    """`--deterministic` evaluates every candidate with the repeat check (each correct candidate's result says
    it was repeatable), under a run name of its own (the CPU target is its own deterministic variant, so only
    the evaluation settings differ)."""
    base = ["optimize", "--workload", "gemm", "--m", "1", "--n", "8", "--k", "16", "--budget", "2", "--timing-ms", "5",
            "--output-dir", str(tmp_path / "out"), "--quiet", "--no-cache"]
    assert cli.main(base) == 0
    assert cli.main(base + ["--deterministic"]) == 0
    configs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/config.json")}
    assert len(configs) == 2
    assert sorted(c["eval"].get("deterministic", False) for c in configs.values()) == [False, True]
    plain = next(c for c in configs.values() if not c["eval"].get("deterministic"))
    assert "repeat_runs" not in plain["eval"]
    for run, config in configs.items():
        results = [json.loads(p.read_text())["result"] for p in (tmp_path / "out" / run).glob("iter-*/*/candidate.json")]
        correct = [r for r in results if r and r["correct"]]
        checked = True if config["eval"].get("deterministic") else None
        assert correct and all(r["extra"].get("repeatable") is checked for r in correct)
