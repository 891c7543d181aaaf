"""The `autocomp-compile` command: one-line errors with exit status 2, targets listing, a real run."""
from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys

import pytest

from autocomp_compile import cli
from autocomp_compile.targets.cpu import bandwidth


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "--workload", "conv2d"], "unknown workload 'conv2d'"),
        (["optimize", "--workload", "gemm", "--target", "tpu"], "unknown target 'tpu'"),
        (["optimize", "--workload", "gemm", "--dtype", "fp16"], "unknown dtype 'fp16'"),
        (["optimize", "--workload", "gemm", "--m", "-3"], "m must be a positive integer"),
        (["optimize", "--workload", "mlp", "--vocab", "5"], "--vocab: not a shape option of mlp (its shape options: --batch, --hidden, --intermediate)"),
        (["optimize", "--workload", "attention", "--heads", "6", "--kv-heads", "4"], "multiple of kv_heads"),
        (["optimize", "--workload", "attention", "--kv-len", "4096", "--max-kv-len", "2048"], "exceeds max_kv_len"),
        (["optimize", "--workload", "attention", "--phase", "train"], "phase must be"),
        (["optimize", "--workload", "gemm", "--budget", "0"], "budget must be >= 1"),
        (["optimize", "--workload", "gemm", "--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["optimize", "--workload", "gemm", "--finalists", "0"], "finalists must be >= 1, got 0"),
        (["optimize", "--workload", "gemm", "--sets", "0"], "--sets must be >= 1"),
        (["optimize", "--workload", "gemm", "--timeout", "nan"], "--timeout must be a finite number, got nan"),
        (["optimize", "--workload", "gemm", "--timing-ms", "inf"], "--timing-ms must be a finite number, got inf"),
        (["optimize", "--workload", "gemm", "--dropout", "nan"], "--dropout must be a finite number"),
        (["optimize", "--workload", "gemm", "--reuse", "-1"], "--reuse must be >= 0, got -1"),
        (["optimize", "--workload", "mlp", "--phase", "prefill", "--kv-len", "5"],
         "--kv-len, --phase: not a shape option of mlp"),
        (["optimize", "--workload", "mlp", "--hidden", "64", "--intermediate", "100000000000"],
         "its tensors take 38400.0 GB, more than this machine's"),
        (["warm", "--model", "tiny-llama", "--prefill", "0"], "--prefill must be in [1, 128] (the KV-cache length"),
        (["warm", "--model", "tiny-llama", "--max-seq-len", "64", "--prefill", "65"], "--prefill must be in [1, 64]"),
        (["warm", "--model", "tiny-llama", "--max-seq-len", "0"], "--max-seq-len must be >= 1, got 0"),
        (["warm", "--model", "tiny-llama", "--batch", "0"], "--batch must be >= 1, got 0"),
        (["warm", "--workers", "-1"], "--workers must be >= 1, got -1"),
        (["warm", "--workers", "0"], "--workers must be >= 1, got 0"),
        (["warm", "--kinds", " ,"], "--kinds: name at least one of"),
        (["warm", "--no-cache"], "warm stores its results in the kernel cache; drop --no-cache"),
        (["warm", "--dtype", "fp16"], "unknown dtype 'fp16'; choose one of ['bf16', 'fp32']"),
        (["warm", "--executor", "ray", "--wandb"], "--executor ray runs the offline proposer without a W&B log"),
        (["warm", "--executor", "ray", "--models", "openai::x"], "LLM proposers (--models) and --wandb run with"),
        (["cache", "clear", "--target", "cuad"], "unknown target 'cuad'"),
        (["cache", "ls", "--target", "bogus"], "unknown target 'bogus'"),
        (["demo", "--timeout=-inf"], "--timeout must be a finite number"),
        (["optimize", "--workload", "rmsnorm", "--eps", "-1"], "eps must be a finite positive number, got -1.0"),
        (["optimize", "--workload", "rmsnorm", "--eps", "nan"], "eps must be a finite positive number, got nan"),
        (["optimize", "--target", "nki", "--workload", "mlp", "--hidden", "100", "--intermediate", "37"],
         "nki: mlp kernels need hidden and intermediate to be multiples of 128"),
        (["optimize", "--target", "nki", "--workload", "lm_head", "--hidden", "256", "--vocab", "100"],
         "nki: lm_head kernels need hidden and vocab to be multiples of 128"),
        (["optimize", "--workload", "gemm", "--prompts", "/nonexistent", "--models", "openai::x", "--api-base",
          "http://127.0.0.1:9/v1"], "--prompts /nonexistent: no such folder"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autocomp-compile: error:") and message in err
    assert "\n" not in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # refused before any work: not even ./output was created


@pytest.mark.parametrize("models", ["", " , "])
def test_models_without_a_name_is_refused_not_taken_for_the_offline_proposer(models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["optimize", "--workload", "gemm", "--models", models])
    assert exit_info.value.code == 2
    assert f"--models: no model names in {models!r}" in capsys.readouterr().err


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


def test_finalists_option_reaches_the_search_and_its_json(tmp_path):
    """The default ends a search with a run-off of its 3 fastest kernels, recorded in --json; `--finalists 1` has
    none, and runs under a name of its own (the run directory records it)."""
    base = ["optimize", "--workload", "gemm", "--m", "1", "--n", "8", "--k", "16", "--budget", "4", "--timing-ms", "5",
            "--output-dir", str(tmp_path / "out"), "--quiet", "--no-cache"]
    assert cli.main(base + ["--json", str(tmp_path / "three.json")]) == 0
    assert cli.main(base + ["--finalists", "1", "--json", str(tmp_path / "one.json")]) == 0
    three, one = (json.loads((tmp_path / f).read_text()) for f in ("three.json", "one.json"))
    assert len(three["run_off"]["finalists"]) == 3 and three["run_off"]["winner"] == three["best_id"]
    assert one["run_off"] is None
    configs = [json.loads(p.read_text())["search"] for p in (tmp_path / "out").glob("*/config.json")]
    assert sorted(c.get("finalists", 3) for c in configs) == [1, 3]


# ---------------------------------------------------------------- bad paths, checked before any search

TINY = ["optimize", "--workload", "gemm", "--m", "1", "--n", "8", "--k", "16", "--budget", "1", "--sets", "1",
        "--timing-ms", "5", "--quiet"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("autocomp-compile: error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def no_search(monkeypatch):
    """Fail the test if a search (or the bandwidth measurement before it) starts."""
    def started(*args, **kwargs):
        raise AssertionError("the command got as far as searching")

    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", started)
    monkeypatch.setattr(importlib.import_module("autocomp_compile.optimize"), "optimize", started)


@pytest.mark.parametrize("option, path, message", [
    ("--json", "afile/x.json", "--json {tmp}/afile/x.json: cannot write this file (Not a directory)"),
    ("--json", "nodir/x.json", "--json {tmp}/nodir/x.json: cannot write this file (No such file or directory)"),
    ("--json", "adir", "--json {tmp}/adir: cannot write this file (Is a directory)"),
    ("--output-dir", "afile/out", "--output-dir {tmp}/afile/out: cannot create this folder (Not a directory)"),
    ("--output-dir", "/proc/out", "--output-dir /proc/out: cannot create this folder"),
])
def test_bad_output_paths_fail_before_the_search(option, path, message, tmp_path, capsys, no_search):
    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "adir").mkdir()
    target = path if path.startswith("/") else str(tmp_path / path)
    assert cli.main(TINY + ["--output-dir", str(tmp_path / "out"), option, target]) == 2
    assert message.format(tmp=tmp_path) in _one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "a regular file"


def test_json_check_leaves_no_file_behind(tmp_path, monkeypatch):
    """The early --json check creates nothing (the file appears only with the results) and keeps an existing one."""
    cli._check_writable(tmp_path / "new.json", "--json")
    assert not (tmp_path / "new.json").exists()
    (tmp_path / "old.json").write_text("kept")
    cli._check_writable(tmp_path / "old.json", "--json")
    assert (tmp_path / "old.json").read_text() == "kept"


@pytest.mark.parametrize("argv", [["cache", "ls"], ["cache", "export", "x.json"], ["cache", "clear"], TINY])
def test_a_cache_dir_under_a_file_is_a_one_line_error(argv, tmp_path, capsys, monkeypatch, no_search):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    assert cli.main(argv + ["--output-dir", str(tmp_path / "out")] if argv is TINY else argv) == 2
    err = _one_line_error(capsys)
    assert f"{tmp_path}/afile/cache" in err and "Not a directory" in err


def test_cache_export_into_a_missing_folder(tmp_path, capsys):
    assert cli.main(["cache", "export", str(tmp_path / "nodir" / "x.json")]) == 2
    assert "cache export" in _one_line_error(capsys) and not (tmp_path / "nodir").exists()


def test_any_os_error_is_a_one_line_error_naming_the_path(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/somewhere/file")

    monkeypatch.setattr(cli, "cmd_targets", denied)
    assert cli.main(["targets"]) == 2
    assert _one_line_error(capsys) == "autocomp-compile: error: /somewhere/file: Permission denied"


# ---------------------------------------------------------------- other options checked up front


def test_prompts_folder_is_checked_before_anything_runs(tmp_path, capsys, no_search):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "overview.md").write_text("# overview")
    llm = ["--models", "openai::x", "--api-base", "http://127.0.0.1:9/v1", "--output-dir", str(tmp_path / "out")]
    assert cli.main(TINY + llm + ["--prompts", str(tmp_path / "missing")]) == 2
    assert "no such folder" in _one_line_error(capsys)
    assert cli.main(TINY + llm + ["--prompts", str(tmp_path / "prompts")]) == 2
    assert "lacks ['isa.md', 'examples.md', 'rules.md']" in _one_line_error(capsys)


def test_workers_help_says_what_it_accepts(capsys):
    with pytest.raises(SystemExit):
        cli.main(["warm", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "parallel compiler processes, at least 1 (default: all cores)" in out
    assert "(>= 0; 0: none)" in out


def test_optimize_api_refuses_a_negative_reuse(tmp_path):
    from autocomp_compile import make_workload, optimize

    with pytest.raises(ValueError, match="reuse must be >= 0"):
        optimize(make_workload("gemm", m=1, n=8, k=16), "cpu", output_dir=tmp_path, reuse=-1)


def test_no_correct_kernel_says_why_the_naive_one_failed(tmp_path, capsys, monkeypatch):
    from autocomp_compile.targets.cpu.target import CpuTarget

    lower = CpuTarget.lower

    def broken(self, workload):
        root = lower(self, workload)
        root.code = "this is not C\n" + root.code
        return root

    monkeypatch.setattr(CpuTarget, "lower", broken)
    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", lambda: 10.0)
    assert cli.main(TINY + ["--output-dir", str(tmp_path / "out"), "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert "gemm: no correct kernel found" in err
    line = next(x for x in err.splitlines() if "the naive kernel failed" in x)
    assert line.startswith("gemm: the naive kernel failed at compile: ") and "error:" in line  # gcc's first error


def test_naive_failure_names_the_exception_that_ended_the_worker():
    from types import SimpleNamespace

    from autocomp_compile.targets.base import EvalResult

    crash = EvalResult.failure("crash", "evaluation raised an exception", stderr="Traceback (most recent call last):\n"
                               "  File \"x.py\", line 1\nRuntimeError: DefaultCPUAllocator: can't allocate memory\n")
    why = cli._naive_failure(SimpleNamespace(root=SimpleNamespace(result=crash)))
    assert why == ("the naive kernel failed at crash: evaluation raised an exception: "
                   "RuntimeError: DefaultCPUAllocator: can't allocate memory")


# ---------------------------------------------------------------- LLM runs: run names, failed calls


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unreachable_models() -> list[str]:
    return ["--models", "openai::x", "--api-base", f"http://127.0.0.1:{_closed_port()}/v1"]


def test_default_run_name_separates_proposers_and_keeps_offline_names():
    import dataclasses
    import hashlib

    from autocomp_compile import make_workload
    from autocomp_compile.evaluation.job import EvalSettings
    from autocomp_compile.optimize import evaluation_config, run_name
    from autocomp_compile.search.beam import SearchConfig
    from autocomp_compile.targets.base import get_target

    w, t, c, e = make_workload("gemm", m=1, n=8, k=16), get_target("cpu"), SearchConfig(), EvalSettings()
    search = {k: v for k, v in dataclasses.asdict(c).items() if k != "finalists"}  # as before the run-off
    blob = json.dumps([w.signature(), t.fingerprint(), search, evaluation_config(e)], sort_keys=True, default=str)
    before = f"gemm-bf16-cpu-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"  # the name runs had: they resume
    assert run_name(w, t, c, e) == run_name(w, t, c, e, ["schedule"]) == before
    llm = run_name(w, t, c, e, ["llm[openai::x]"])
    assert llm != before and llm != run_name(w, t, c, e, ["llm[openai::y]"])


def test_adding_models_to_an_offline_run_is_not_a_conflict(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_LLM_BACKOFF_S", "0.01")
    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", lambda: 10.0)
    argv = TINY + ["--output-dir", str(tmp_path / "out"), "--no-cache"]
    assert cli.main(argv) == 0
    assert cli.main(argv + _unreachable_models()) != 2
    assert "different settings" not in capsys.readouterr().err
    proposers = sorted(json.loads(p.read_text())["proposers"] for p in (tmp_path / "out").glob("*/config.json"))
    assert proposers == [["llm[openai::x]"], ["schedule"]]


def test_unreachable_model_server_is_reported_and_fails_the_run(tmp_path, capsys, monkeypatch):
    """Every model call failed and nothing beat the naive kernel: one line says so, with the first error, and the
    exit status is 1 (not 0 with "search space exhausted")."""
    monkeypatch.setenv("AUTOCOMP_LLM_BACKOFF_S", "0.01")
    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", lambda: 10.0)
    out = tmp_path / "r.json"
    argv = TINY + ["--budget", "3", "--output-dir", str(tmp_path / "out"), "--no-cache", "--json", str(out)]
    assert cli.main(argv + _unreachable_models()) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "model call(s) failed" in x)
    assert line.startswith("gemm: all ") and "first error: openai::x: " in line
    row = json.loads(out.read_text())
    assert row["correct"] and row["best_id"] == "root"
    assert row["llm"]["calls"] == 0 and row["llm"]["failures"] >= 1 and row["llm"]["first_error"].startswith("openai::x")
    assert f"all {row['llm']['failures']} model call(s) failed" in line


def test_a_search_whose_model_calls_all_failed_caches_nothing(tmp_path, monkeypatch):
    """Otherwise the naive kernel would be cached and the same command, run again once the server is up, would
    return it as a cache hit without asking any model."""
    monkeypatch.setenv("AUTOCOMP_LLM_BACKOFF_S", "0.01")
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", lambda: 10.0)
    argv = TINY + ["--budget", "3", "--output-dir", str(tmp_path / "out")]
    assert cli.main(argv + _unreachable_models()) == 1
    from autocomp_compile.kernels_cache.store import KernelCache

    with KernelCache(tmp_path / "cache" / "kernels.sqlite") as cache:
        assert cache.entries() == []
    assert cli.main(argv) == 0  # the offline search does cache its winner
    with KernelCache(tmp_path / "cache" / "kernels.sqlite") as cache:
        assert len(cache.entries()) == 1


def test_exit_status_fails_only_where_the_models_did_nothing():
    ok = {"correct": True, "best_id": "root", "best_iteration": 0}
    failed_calls = {"calls": 0, "failures": 3, "first_error": "x"}
    assert cli._status([ok]) == 0
    assert cli._status([{**ok, "llm": failed_calls}]) == 1
    # a reused schedule beat the naive one: still no search (and nothing cached, or the next run would be a hit)
    assert cli._status([{**ok, "best_id": "seed0", "llm": failed_calls}]) == 1
    assert cli._status([{**ok, "best_id": "i2c01", "best_iteration": 2, "llm": failed_calls}]) == 0  # menu proposer
    assert cli._status([{**ok, "llm": {**failed_calls, "calls": 1}}]) == 0  # some calls answered
    assert cli._status([{**ok, "correct": False}]) == 1


def test_an_option_the_phase_does_not_use_is_named_and_ignored(tmp_path, capsys, monkeypatch):
    """--kv-len on prefill attention would have given the same kernel another cache key; it is ignored, saying so."""
    seen = []

    def record(workloads, args, run_name, **kwargs):
        seen.extend(workloads)
        return []

    monkeypatch.setattr(cli, "_run", record)
    monkeypatch.setattr(cli, "_status", lambda rows: 0)
    argv = ["optimize", "--workload", "attention", "--phase", "prefill", "--seq-len", "16", "--kv-len", "4096",
            "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    assert "--kv-len does not apply to prefill attention; ignored" in capsys.readouterr().err
    [w] = seen
    assert w.params["kv_len"] == 1024 and w.params["seq_len"] == 16


@pytest.mark.parametrize("argv, message", [
    (["optimize", "--budget", "many", "--workload", "gemm"], "autocomp-compile optimize: error: argument --budget: "
                                                             "invalid int value: 'many' (see autocomp-compile optimize --help)"),
    (["optimize"], "the following arguments are required: --workload"),
    (["warm", "--model", "gpt2"], "argument --model: invalid choice: 'gpt2'"),
    (["frobnicate"], "autocomp-compile: error: argument command: invalid choice"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "usage:" not in err, err


def test_wandb_missing_fails_before_the_search(tmp_path, capsys, monkeypatch, no_search):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert cli.main(TINY + ["--output-dir", str(tmp_path / "out"), "--wandb"]) == 2
    assert "--wandb needs wandb: pip install wandb" in _one_line_error(capsys)


def test_cache_ls_marks_simulated_latencies(tmp_path, monkeypatch, capsys):
    from autocomp_compile.kernels_cache.store import KernelCache
    from tests.kernels_cache.test_store import FakeTarget, cand, gemm

    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path))
    emulated = FakeTarget("nki")
    emulated._fp["simulated"] = True
    with KernelCache(tmp_path / "kernels.sqlite") as cache:
        cache.put(FakeTarget(), gemm(n=64), cand("int a;", 1.0))
        cache.put(emulated, gemm(n=128), cand("int b;", 1.0))
    assert cli.main(["cache", "ls"]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert "SIMULATED" in lines["nki"] and "measured" in lines["cpu"]


def test_models_with_a_target_the_llm_proposer_does_not_write_for_is_a_usage_error(tmp_path, capsys):
    argv = TINY + ["--n", "128", "--k", "128", "--target", "nki", "--output-dir", str(tmp_path), "--no-cache"]
    argv += _unreachable_models()
    assert cli.main(argv) == 2
    assert "the LLM proposer writes c and cuda kernels, not 'nki' ones" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_json_through_a_symlink_writes_its_target(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    cli._write_json(str(link), [{"a": 1}])
    assert link.is_symlink() and json.loads(target.read_text()) == [{"a": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "results.json"]  # no temporary file left


class _Cache:
    """Stands in for the kernel cache in `cache clear`'s confirmation tests."""

    path = "/somewhere/kernels.sqlite"

    def __init__(self, n: int):
        self.n, self.cleared = n, False

    def entries(self, target):
        return [object()] * self.n

    def clear(self, target):
        self.cleared = True
        return self.n


@pytest.mark.parametrize("tty, answer, yes, status, cleared", [
    (False, None, False, "usage", False),  # a script: --yes or nothing
    (False, None, True, 0, True),
    (True, "n", False, 1, False),
    (True, "", False, 1, False),  # the default is no
    (True, "y", False, 0, True),
    (True, None, True, 0, True),  # --yes: no question
])
def test_cache_clear_asks_first(tty, answer, yes, status, cleared, monkeypatch, capsys):
    cache = _Cache(3)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: tty)
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or answer)
    if status == "usage":
        with pytest.raises(cli.UsageError, match="cache clear would delete 3 kernel"):
            cli._clear(cache, None, yes)
    else:
        assert cli._clear(cache, "cpu", yes) == status
    assert cache.cleared == cleared
    assert bool(asked) == (tty and not yes)
    if asked:
        assert asked[0] == "delete 3 kernel(s) of target cpu from /somewhere/kernels.sqlite? [y/N] "


def test_clearing_an_empty_cache_asks_nothing(monkeypatch, capsys):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    assert cli._clear(_Cache(0), None, False) == 0
    assert "deleted 0 kernel(s)" in capsys.readouterr().out
