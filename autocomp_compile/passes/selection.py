"""Which kernel, if any, replaces a recognised subgraph: shared by the torch.compile backend and the TVM pass.

`KernelSelector.decide(workload)` looks the workload up in the kernel cache (or searches for it in
`search` mode), applies `min_speedup`, loads the kernel into this process and checks it once more
against the reference. A `Decision` says what happened and why; a `GraphReport` collects them per graph.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Sequence, TypeVar

from autocomp_compile.passes.kernels import REGISTRY, KernelUnavailable

if TYPE_CHECKING:
    from autocomp_compile.targets.base import Target
    from autocomp_compile.workload import Workload

MODES = ("cache-only", "search", "off")
R = TypeVar("R")  # a recognised region of a graph: an fx Match or a Relax Region


@dataclass
class Decision:
    """What happened to one workload of a graph (all its occurrences)."""

    kind: str
    workload: str
    count: int
    replaced: bool
    source: str = ""  # "cache" or "search"
    speedup: float | None = None
    reason: str = ""
    key: str | None = None


@dataclass
class GraphReport:
    target: str
    mode: str
    decisions: list[Decision] = field(default_factory=list)
    seconds: float = 0.0
    pipeline: str = "autocomp"
    deterministic: bool = False

    @property
    def replaced(self) -> int:
        return sum(d.count for d in self.decisions if d.replaced)

    @property
    def total(self) -> int:
        return sum(d.count for d in self.decisions)

    def summary(self) -> str:
        target = f"{self.target}, deterministic kernels only" if self.deterministic else self.target
        lines = [f"{self.pipeline} ({target}, {self.mode}): replaced {self.replaced} of {self.total} recognised "
                 f"subgraphs in {self.seconds:.1f} s"]
        for d in self.decisions:
            if d.replaced:
                what = f"{d.source}, {d.speedup:.2f}x eager" if d.speedup else d.source
                lines.append(f"  + {d.count:3d} x {d.workload}: {what}")
            else:
                lines.append(f"  - {d.count:3d} x {d.workload}: not replaced: {d.reason}")
        return "\n".join(lines)


def log(verbose: bool, text: str) -> None:
    if verbose:
        print(text, file=sys.stderr, flush=True)


class KernelSelector:
    """Finds (or searches for) the kernel of a workload and loads it; one per compile, closed after.

    `deterministic` (default: whether `torch.use_deterministic_algorithms(True)` is in force when the selector
    is made) restricts it to the target's bit-reproducible kernels, which have their own cache entries.
    `timing_ms` (default: the evaluator's) is the timing budget of each candidate a search evaluates, and of an
    imported kernel's check.
    """

    def __init__(self, target: "Target", mode: str = "cache-only", budget: int = 16, min_speedup: float = 1.0,
                 cache_dir: str | None = None, output_dir: str = "output", seed: int = 0,
                 models: tuple[str, ...] = (), api_base: str | None = None, verbose: bool = True,
                 deterministic: bool | None = None, timing_ms: float | None = None):
        import torch

        from autocomp_compile.evaluation.job import EvalSettings
        from autocomp_compile.kernels_cache.store import CacheError, KernelCache
        from autocomp_compile.targets.base import deterministic_variant

        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        self.deterministic = bool(deterministic)
        self.target = deterministic_variant(target) if deterministic else target
        self.mode = mode
        self.budget = budget
        self.min_speedup = min_speedup
        self.output_dir = output_dir
        self.seed = seed
        self.verbose = verbose
        self.settings = EvalSettings(seed=seed, deterministic=self.deterministic)
        if timing_ms is not None:
            self.settings = dataclasses.replace(self.settings, timing_budget_ms=timing_ms)
        # A cache that cannot be opened (read-only, under a read-only path) leaves every subgraph to PyTorch:
        # a compiled graph is correct whatever the state of the cache.
        self.cache: KernelCache | None = None
        self.cache_problem = ""
        try:
            self.cache = KernelCache.in_directory(cache_dir)
        except (CacheError, OSError) as exc:
            self.cache_problem = f"the kernel cache cannot be opened ({exc})"
            log(verbose, f"autocomp: {self.cache_problem}; every subgraph stays with PyTorch")
        self.proposers = None
        if models and mode == "search":
            from autocomp_compile.agents.llm import LLMProposer
            from autocomp_compile.agents.llm_client import LLMClient

            self.proposers = [LLMProposer(LLMClient(models, api_base=api_base))]

    def decide(self, workload: "Workload") -> Decision:
        from autocomp_compile.optimize import check_imported, optimize
        from autocomp_compile.search.beam import SearchConfig

        kind, name = workload.kind, workload.name
        if self.cache is None:
            return Decision(kind, name, 0, False, reason=self.cache_problem)
        entry = self.cache.get(self.target, workload)
        if entry is not None and entry.unchecked:  # imported: evaluated here once before it may replace anything
            log(self.verbose, f"autocomp: checking the imported kernel for {name} on this machine ...")
            entry = check_imported(self.cache, self.target, workload, entry, self.settings)
        source = "cache"
        unusable = entry is None or (self.deterministic and not entry.reproducible)
        if unusable and self.mode == "search":
            t0 = time.perf_counter()
            log(self.verbose, f"autocomp: searching {name} ({self.budget} candidates) ...")
            result = optimize(workload, self.target, SearchConfig(budget=self.budget, seed=self.seed), self.settings,
                              output_dir=self.output_dir, cache=self.cache, proposers=self.proposers)
            log(self.verbose, f"autocomp: {name} searched in {time.perf_counter() - t0:.0f} s")
            entry = self.cache.get(self.target, workload) if result.best is not None else None
            source = "search"
            if entry is None:
                return Decision(kind, name, 0, False, reason="search found no correct kernel")
        if entry is None:
            warm = "`autocomp-compile warm --deterministic`" if self.deterministic else "`autocomp-compile warm`"
            reason = f"not in the kernel cache (run {warm} or use mode='search')"
            others = self.cache.row_counts(self.target, workload)
            if others:
                reason += (f"; cached for {workload.rows_param()} = {', '.join(map(str, others))} "
                           "(generate(..., prefill_buckets=...) pads prompts to warmed lengths)")
            return Decision(kind, name, 0, False, reason=reason)
        speedup = entry.speedup
        if self.deterministic and not entry.reproducible:
            return Decision(kind, name, 0, False, source, speedup, key=entry.key,
                            reason=f"cached kernel {entry.key} was written by an LLM and never checked for "
                                   f"bit-reproducibility; PyTorch runs it (a search with --deterministic, or "
                                   f"mode='search', replaces it with a checked kernel)")
        if speedup is not None and speedup < self.min_speedup:
            return Decision(kind, name, 0, False, source, speedup, key=entry.key,
                            reason=f"the best kernel is {speedup:.2f}x eager, below min_speedup {self.min_speedup}")
        try:
            REGISTRY.add(entry.key, self.target, workload, entry.candidate())
        except KernelUnavailable as exc:
            return Decision(kind, name, 0, False, source, speedup, key=entry.key, reason=str(exc))
        return Decision(kind, name, 0, True, source, speedup, key=entry.key)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def decide_region(selector: KernelSelector, decisions: dict[str, Decision], kind: str, workload: "Workload | None",
                  reason: str, kinds: Sequence[str], kinds_option: str = "kinds") -> Decision:
    """One recognised region's Decision, shared by every region of the same workload (`decisions`): why not, when
    it has no workload or its kind is not asked for; else the selector's."""
    if workload is None:
        return decisions.setdefault(f"{kind}:{reason}", Decision(kind, kind, 0, False, reason=reason))
    sig = workload.signature()
    if kind not in kinds:
        return decisions.setdefault(sig, Decision(kind, workload.name, 0, False,
                                                  reason=f"kind {kind!r} not in {kinds_option}"))
    if sig not in decisions:
        decisions[sig] = selector.decide(workload)
    return decisions[sig]


def decide_releasing(find: Callable[[frozenset], list[R]], decide: Callable[[R], Decision],
                     anchor: Callable[[R], Hashable]) -> list[tuple[R, Decision]]:
    """Each region `find(released)` lists, with its Decision. An MLP left to the host compiler is released (its
    anchor joins `released`) and the graph searched again, so that its projections are offered as linears."""
    released: frozenset = frozenset()
    while True:
        outcome = [(r, decide(r)) for r in find(released)]
        left = {anchor(r) for r, d in outcome if r.kind == "mlp" and r.workload is not None and not d.replaced}
        if left <= released:
            return outcome
        released |= left
