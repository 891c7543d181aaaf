"""warm --executor ray: searches run as Ray tasks on a local cluster, the driver caches the winners."""
from __future__ import annotations

import json

import pytest

from autocomp_compile import cli
from autocomp_compile.executors import NodeTarget, SearchJob, run_search_job
from autocomp_compile.kernels_cache import KernelCache
from autocomp_compile.search.beam import SearchConfig
from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.workload import make_workload


def test_a_search_job_round_trips_as_plain_data(tmp_path):
    w = make_workload("gemm", "fp32", m=1, n=16, k=32)
    job = SearchJob.make(w, "cpu", SearchConfig(budget=2), EvalSettings(timing_budget_ms=10), tmp_path / "o", [])
    out = run_search_job(job)
    assert out["row"]["correct"] and out["best"]["result"]["correct"]
    assert out["fingerprint"]["target"] == "cpu" and out["host"]
    assert NodeTarget("cpu", out["fingerprint"]).fingerprint() is out["fingerprint"]


def test_ray_executor_without_ray_is_a_clear_error(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    argv = ["warm", "--model", "tiny-llama", "--kinds", "lm_head", "--budget", "2", "--executor", "ray", "--quiet"]
    assert cli.main(argv) == 2
    assert "pip install 'autocomp-compile[ray]'" in capsys.readouterr().err


def test_warm_on_a_local_ray_cluster_is_idempotent(tmp_path, capsys, monkeypatch):
    """Also where the driver is another machine than the nodes (its fingerprint differs: the second warm
    re-searched everything), and later searches start from earlier winners of the same warm."""
    ray = pytest.importorskip("ray")
    from autocomp_compile.targets.cpu.target import CpuTarget

    from autocomp_compile import executors

    node_fingerprint = CpuTarget.fingerprint
    monkeypatch.setattr(CpuTarget, "fingerprint", lambda self: {**node_fingerprint(self), "cpu": "the driver's CPU"})
    donors: list[tuple[str, int]] = []  # (kind, donors) of each job as the driver makes it
    make = executors.SearchJob.make

    def recording_make(w, *args, **kwargs):
        job = make(w, *args, **kwargs)
        donors.append((w.kind, len(job.donors)))
        return job

    monkeypatch.setattr(executors.SearchJob, "make", recording_make)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 * 1024)
    try:
        argv = ["warm", "--model", "tiny-llama", "--kinds", "lm_head,gemm", "--budget", "3", "--timing-ms", "20",
                "--executor", "ray", "--output-dir", str(tmp_path / "o"), "--quiet", "--json", str(tmp_path / "a.json")]
        assert cli.main(argv) == 0
        printed = capsys.readouterr()
        # without "mlp" in the kinds the MLP's projections are GEMMs too (as the backend replaces them): 4 GEMMs
        assert "5 search(es)" in printed.out + printed.err
        first = json.loads((tmp_path / "a.json").read_text())
        assert len(first) == 5 and all(r["correct"] and not r["from_cache"] for r in first)
        # a GEMM's job made after another's winner was cached gets it as a donor (whether its seed survives
        # deduplication against the search's own kernels depends on what the earlier search found)
        gemm_donors = [n for kind, n in donors if kind == "gemm"]
        assert gemm_donors[0] == 0 and max(gemm_donors) >= 1, gemm_donors
        entries = KernelCache().entries()
        assert {e.kind for e in entries} == {"gemm", "lm_head"}
        assert all(e.provenance["executor"] == "ray" and e.provenance["run"] for e in entries)
        assert all(e.fingerprint["cpu"] != "the driver's CPU" for e in entries)  # the nodes' own
        argv[-1] = str(tmp_path / "b.json")
        assert cli.main(argv) == 0
        second = json.loads((tmp_path / "b.json").read_text())
        assert [r["from_cache"] for r in second] == [True] * 5
        printed = capsys.readouterr()
        assert "search(es)" not in printed.out + printed.err  # nothing was submitted the second time
    finally:
        ray.shutdown()


def test_an_unreachable_ray_address_fails_in_seconds():
    """Ray retries an address that does not answer for minutes; the executor checks it first."""
    import time

    from autocomp_compile.executors import ExecutorError, RayExecutor

    t0 = time.perf_counter()
    with pytest.raises(ExecutorError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        RayExecutor("127.0.0.1:1")
    assert time.perf_counter() - t0 < 10


def _timed_stand_in(job):
    """Stands in for run_search_job: which node ran it, and when."""
    import time

    import ray

    start = time.time()
    time.sleep(1.0)
    return {"node": ray.get_runtime_context().get_node_id(), "start": start, "end": time.time()}


def test_ray_runs_one_search_per_node_at_a_time_and_skips_cpu_less_nodes(monkeypatch):
    """A head without CPUs runs nothing; a 2-CPU node next to a 1-CPU node never runs two searches at once
    (tasks asked for the smallest node's CPUs before, so the larger node took two)."""
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    from autocomp_compile import executors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        monkeypatch.setattr(executors, "run_search_job", _timed_stand_in)
        executor = executors.RayExecutor(cluster.address)
        assert "2 node(s)" in executor.describe()
        results = [r for _, r in executor.map([lambda node: None] * 4)]
        assert len({r["node"] for r in results}) == 2
        for node in {r["node"] for r in results}:
            spans = sorted((r["start"], r["end"]) for r in results if r["node"] == node)
            assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    finally:
        ray.shutdown()
        cluster.shutdown()


def _failing_stand_in(job):
    if job == "fails":
        raise ValueError("conflicting run directory")
    return {"ran": job}


def test_a_failed_ray_task_is_one_error_row_and_the_others_finish(monkeypatch):
    pytest.importorskip("ray")
    import ray

    from autocomp_compile import executors

    monkeypatch.setattr(executors, "run_search_job", _failing_stand_in)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 * 1024)
    try:
        executor = executors.RayExecutor()
        out = dict(executor.map([lambda node: "a", lambda node: "fails", lambda node: "b"]))
    finally:
        ray.shutdown()
    assert out[0] == {"ran": "a"} and out[2] == {"ran": "b"}
    assert out[1] == {"error": "ValueError: conflicting run directory"}


def _sleeping_stand_in(job):
    import time

    import ray

    time.sleep(job)
    return {"node": ray.get_runtime_context().get_node_id()}


def test_jobs_of_a_node_that_leaves_the_cluster_run_on_the_others(monkeypatch):
    """The job a dead node was running goes back to the queue; the jobs behind it were pinned to the dead node
    and failed at once before."""
    pytest.importorskip("ray")
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from autocomp_compile import executors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        leaving = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setattr(executors, "run_search_job", _sleeping_stand_in)
        executor = executors.RayExecutor(cluster.address)
        assert len(executor.node_cpus) == 2
        threading.Timer(0.5, lambda: cluster.remove_node(leaving, allow_graceful=False)).start()
        out = dict(executor.map([lambda node: 2.0] * 4))
        assert sorted(out) == [0, 1, 2, 3] and not [r for r in out.values() if "error" in r]
        assert {r["node"] for r in out.values()} == set(executor.node_cpus) and leaving.node_id not in executor.node_cpus
    finally:
        ray.shutdown()
        cluster.shutdown()
