"""Where `warm` runs its searches: in this process one workload after another, or on a Ray cluster.

With Ray, each workload missing from the cache becomes one task that runs a whole `optimize()` on a
cluster node and returns the winner; the driver stores it in its own cache as soon as the task ends
(so an interrupted warm keeps every finished workload, and each node resumes its own run directories).
A task asks for every CPU of a node: two searches timing kernels on the same cores would corrupt each
other's measurements. Kernels are cached under the fingerprint of the node that measured them, and a job
is made when a node frees up: its schedule-reuse donors are ranked for that node and include the winners
of the tasks finished so far, and the node legalises their schedules for its own ISA.
"""
from __future__ import annotations

import dataclasses
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.kernels_cache.store import CacheEntry
from autocomp_compile.search.beam import SearchConfig
from autocomp_compile.workload import Workload

EXECUTORS = ("local", "ray")


class ExecutorError(RuntimeError):
    """The executor cannot run (Ray missing, cluster unreachable)."""


@dataclass(frozen=True)
class SearchJob:
    """One workload's search, as plain data that pickles to a cluster node. `donors` are cache entries whose
    schedules seed the search (schedule reuse), legalised on the node."""

    workload: dict[str, Any]
    target: str
    config: dict[str, Any]
    settings: dict[str, Any]
    output_dir: str
    donors: list[dict[str, Any]]

    @classmethod
    def make(cls, workload: Workload, target: str, config: SearchConfig, settings: EvalSettings,
             output_dir: str | Path, donors: Sequence[CacheEntry] = ()) -> "SearchJob":
        return cls(workload.describe(), target, dataclasses.asdict(config), dataclasses.asdict(settings),
                   str(Path(output_dir).resolve()), [dataclasses.asdict(e) for e in donors])


def target_here(target: str, deterministic: bool) -> Any:
    """The target `target` of the machine this function runs on (a cluster node, in a Ray task)."""
    from autocomp_compile.targets.base import get_target

    return get_target(target, deterministic=deterministic)


def node_fingerprint(target: str, deterministic: bool) -> dict[str, Any]:
    """The fingerprint kernels measured where this function runs are cached under."""
    return target_here(target, deterministic).fingerprint()


def run_search_job(job: SearchJob) -> dict[str, Any]:
    """Run one search where this function is called; returns the summary row, the winner and the node."""
    from autocomp_compile.optimize import optimize, reuse_seeds, run_name
    from autocomp_compile.search.beam import summarize
    from autocomp_compile.workload import workload_from_dict

    workload = workload_from_dict(job.workload)
    target = target_here(job.target, job.settings.get("deterministic", False))
    config, settings = SearchConfig(**job.config), EvalSettings(**job.settings)
    seeds = reuse_seeds(target, workload, [CacheEntry(**d) for d in job.donors])
    name = run_name(workload, target, config, settings)
    result = optimize(workload, target, config, settings, job.output_dir, name, seeds=seeds)
    return {
        "run": name,
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


def task_error(exc: BaseException) -> str:
    """One line for a failed Ray task: the exception raised on the node, not Ray's wrapped traceback."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:400]


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

    def _on(self, node: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node, soft=False)

    def node_fingerprints(self, target: str, deterministic: bool = False) -> dict[str, dict[str, Any]]:
        """Each CPU node's fingerprint of `target`, asked on the node: the driver may be another machine."""
        ask = self.ray.remote(num_cpus=0)(node_fingerprint)
        refs = {node: ask.options(scheduling_strategy=self._on(node)).remote(target, deterministic)
                for node in self.node_cpus}
        try:
            return {node: self.ray.get(ref) for node, ref in refs.items()}
        except self.ray.exceptions.RayError as exc:
            raise ExecutorError(f"a Ray node cannot use target {target!r}: {task_error(exc)}") from None

    def map(self, jobs: Sequence[Callable[[str], SearchJob]]) -> Iterator[tuple[int, dict[str, Any]]]:
        """One search per node at a time, pinned to the node with all of its CPUs (a task asking for the smallest
        node's CPUs would share a larger node with another search); a node takes the next job when it is free.
        Each job is made, for the node that will run it, only then (`jobs[i](node_id)`), after the caller has
        taken the results yielded so far. A failed task yields `{"error": "..."}`; the others go on. A node whose
        task failed as a node does (it left the cluster, its worker or raylet died) takes no more jobs, and the
        job goes back to the queue once (a job that loses a second node is an error row)."""
        queue = deque(enumerate(jobs))
        pending: dict[Any, tuple[int, str, Callable[[str], SearchJob]]] = {}
        errors = self.ray.exceptions
        node_failures = (errors.NodeDiedError, errors.TaskUnschedulableError, errors.WorkerCrashedError,
                         errors.LocalRayletDiedError)
        requeued: set[int] = set()

        def fill() -> None:
            busy = {node for _, node, _ in pending.values()}
            for node in list(self.node_cpus):
                if queue and node not in busy:
                    index, make_job = queue.popleft()
                    ref = self._search.options(num_cpus=self.node_cpus[node],
                                               scheduling_strategy=self._on(node)).remote(make_job(node))
                    pending[ref] = (index, node, make_job)

        fill()
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            index, node, make_job = pending.pop(done[0])
            try:
                result = self.ray.get(done[0])
            except errors.RayError as exc:
                lost = isinstance(exc, node_failures) or not self._alive(node)
                if lost:
                    self.node_cpus.pop(node, None)
                    if not self.node_cpus:
                        raise ExecutorError("every Ray node with CPUs has left the cluster or failed") from None
                if lost and index not in requeued:
                    requeued.add(index)
                    queue.appendleft((index, make_job))
                    fill()
                    continue
                result = {"error": task_error(exc)}
            yield index, result
            fill()

    def _alive(self, node: str) -> bool:
        return any(n["NodeID"] == node and n.get("Alive") for n in self.ray.nodes())

    def describe(self) -> str:
        return f"Ray cluster: {len(self.node_cpus)} node(s) with CPUs, one search per node at a time"
