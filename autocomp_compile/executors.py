"""Where `warm` runs its searches: in this process one workload after another, or on a Ray cluster.

With Ray, each workload missing from the cache becomes one task that runs a whole `optimize()` on a
cluster node and returns the winner; the driver stores it in its own cache as soon as the task ends
(so an interrupted warm keeps every finished workload, and each node resumes its own run directories).
A task asks for every CPU of a node: two searches timing kernels on the same cores would corrupt each
other's measurements. Kernels are cached under the fingerprint of the node that measured them.
"""
from __future__ import annotations

import dataclasses
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.search.beam import SearchConfig
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.workload import Workload

EXECUTORS = ("local", "ray")


class ExecutorError(RuntimeError):
    """The executor cannot run (Ray missing, cluster unreachable)."""


@dataclass(frozen=True)
class SearchJob:
    """One workload's search, as plain data that pickles to a cluster node."""

    workload: dict[str, Any]
    target: str
    config: dict[str, Any]
    settings: dict[str, Any]
    output_dir: str
    seeds: list[dict[str, Any]]

    @classmethod
    def make(cls, workload: Workload, target: str, config: SearchConfig, settings: EvalSettings,
             output_dir: str | Path, seeds: list[Candidate]) -> "SearchJob":
        return cls(workload.describe(), target, dataclasses.asdict(config), dataclasses.asdict(settings),
                   str(Path(output_dir).resolve()), [s.to_dict() for s in seeds])


def run_search_job(job: SearchJob) -> dict[str, Any]:
    """Run one search where this function is called; returns the summary row, the winner and the node."""
    from autocomp_compile.optimize import optimize
    from autocomp_compile.search.beam import summarize
    from autocomp_compile.targets.base import get_target
    from autocomp_compile.workload import workload_from_dict

    workload = workload_from_dict(job.workload)
    target = get_target(job.target, deterministic=job.settings.get("deterministic", False))
    result = optimize(workload, target, SearchConfig(**job.config), EvalSettings(**job.settings), job.output_dir,
                      seeds=[Candidate.from_dict(s) for s in job.seeds])
    return {
        "row": summarize(result, workload),
        "best": result.best.to_dict() if result.best else None,
        "fingerprint": target.fingerprint(),
        "host": socket.gethostname(),
    }


@dataclass(frozen=True)
class NodeTarget:
    """Stands in for the target of the node that measured a kernel when the driver caches it."""

    name: str
    fp: dict[str, Any]

    def fingerprint(self) -> dict[str, Any]:
        return self.fp


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds where a cluster's host:port does not answer (Ray itself retries for minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ExecutorError(f"cannot reach the Ray cluster at {address}: {exc}") from None


class RayExecutor:
    """Runs search jobs as Ray tasks, one per node at a time; yields (index, result) as tasks finish."""

    def __init__(self, address: str | None = None, **init_kwargs: Any):
        _check_reachable(address)
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'autocomp-compile[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExecutorError(f"cannot start or reach the Ray cluster at {address or 'local'}: {exc}") from exc
        # Nodes without CPUs (a head started with --num-cpus=0) run no searches.
        self.node_cpus = {n["NodeID"]: n["Resources"]["CPU"] for n in ray.nodes()
                          if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1}
        if not self.node_cpus:
            raise ExecutorError("the Ray cluster has no node with a CPU")
        self._search = ray.remote(max_retries=1)(run_search_job)

    def map(self, jobs: list[SearchJob]) -> Iterator[tuple[int, dict[str, Any]]]:
        """One search per node at a time, pinned to the node with all of its CPUs (a task asking for the smallest
        node's CPUs would share a larger node with another search); a node takes the next job when it is free."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        queue = deque(enumerate(jobs))
        pending: dict[Any, tuple[int, str]] = {}

        def submit(node: str) -> None:
            if queue:
                index, job = queue.popleft()
                strategy = NodeAffinitySchedulingStrategy(node, soft=False)
                ref = self._search.options(num_cpus=self.node_cpus[node], scheduling_strategy=strategy).remote(job)
                pending[ref] = (index, node)

        for node in self.node_cpus:
            submit(node)
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            index, node = pending.pop(done[0])
            submit(node)
            yield index, self.ray.get(done[0])

    def describe(self) -> str:
        return f"Ray cluster: {len(self.node_cpus)} node(s) with CPUs, one search per node at a time"
