"""The `autocomp` torch.compile backend.

    torch.compile(model, backend="autocomp", options={"mode": "cache-only"})

Dynamo's graph goes through inductor's own AOT step; on the resulting aten graph, `passes.fx` finds
attention, SwiGLU MLP, LM head, linear and RMSNorm subgraphs, each one is looked up in the kernel
cache (or searched for, in `search` mode), and the ones with a correct kernel that beat PyTorch are
replaced by `torch.ops.autocomp.*` calls. Inductor compiles everything else as usual.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from autocomp_compile.passes import ALL_KINDS, DEFAULT_KINDS
from autocomp_compile.passes.fx import Match, find_subgraphs
from autocomp_compile.passes.kernels import REGISTRY, KernelUnavailable
from autocomp_compile.targets.base import Target, TargetError, get_target, require_available

MODES = ("cache-only", "search", "off")


class BackendOptionsError(ValueError):
    pass


@dataclass(frozen=True)
class BackendOptions:
    """Options of the autocomp backend (`torch.compile(..., options={...})`).

    target: "cpu", "cuda", ... (default: the device of the model's tensors).
    mode: "cache-only" uses cached kernels and leaves the rest to inductor; "search" also optimizes
        the workloads the cache lacks (within `budget` candidates each) and caches the winners;
        "off" is plain inductor.
    kinds: which recognised subgraphs may be replaced. RMSNorm is off by default: inductor fuses it
        with the residual add around it, which one kernel call per norm does not beat at decode.
    min_speedup: a kernel replaces PyTorch only when its measured speedup over eager reaches this.
    cache_dir: the kernel cache directory (default $AUTOCOMP_CACHE_DIR or ~/.cache/autocomp_compile).
    output_dir: where `search` mode writes its runs. verbose: print a summary per compiled graph.
    models, api_base: LLM models (`provider::model`) that propose kernels in `search` mode, and an
        OpenAI-compatible server for them; without models the offline menu-driven proposer searches.
    """

    target: str | None = None
    mode: str = "cache-only"
    budget: int = 16
    kinds: tuple[str, ...] = DEFAULT_KINDS
    min_speedup: float = 1.0
    cache_dir: str | None = None
    output_dir: str = "output"
    seed: int = 0
    verbose: bool = True
    models: tuple[str, ...] = ()  # LLM proposers for search mode (provider::model); default: offline proposer
    api_base: str | None = None  # OpenAI-compatible server for the models

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise BackendOptionsError(f"unknown autocomp option(s) {unknown}; valid: {sorted(names)}")
        for name in ("kinds", "models"):
            if name in options:
                options[name] = (options[name],) if isinstance(options[name], str) else tuple(options[name])
        opts = cls(**options)
        if opts.mode not in MODES:
            raise BackendOptionsError(f"autocomp option mode={opts.mode!r}; choose one of {list(MODES)}")
        bad = sorted(set(opts.kinds) - set(ALL_KINDS))
        if bad:
            raise BackendOptionsError(f"autocomp option kinds: unknown {bad}; choose from {list(ALL_KINDS)}")
        if opts.budget < 1:
            raise BackendOptionsError(f"autocomp option budget must be >= 1, got {opts.budget}")
        return opts


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

    @property
    def replaced(self) -> int:
        return sum(d.count for d in self.decisions if d.replaced)

    @property
    def total(self) -> int:
        return sum(d.count for d in self.decisions)

    def summary(self) -> str:
        lines = [f"autocomp ({self.target}, {self.mode}): replaced {self.replaced} of {self.total} recognised "
                 f"subgraphs in {self.seconds:.1f} s"]
        for d in self.decisions:
            if d.replaced:
                what = f"{d.source}, {d.speedup:.2f}x eager" if d.speedup else d.source
                lines.append(f"  + {d.count:3d} x {d.workload}: {what}")
            else:
                lines.append(f"  - {d.count:3d} x {d.workload}: not replaced: {d.reason}")
        return "\n".join(lines)


REPORTS: list[GraphReport] = []


def reports() -> list[GraphReport]:
    """Reports of every graph the backend compiled in this process, oldest first."""
    return list(REPORTS)


def _pick_target(opts: BackendOptions, example_inputs: Sequence[Any]) -> Target:
    name = opts.target
    if name is None:
        devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
        name = "cuda" if "cuda" in devices else "cpu"
    target = get_target(name)
    require_available(target)
    return target


class Rewriter:
    """Decides, per workload, whether a kernel replaces the subgraph, then rewrites the graph."""

    def __init__(self, opts: BackendOptions, target: Target):
        from autocomp_compile.kernels_cache.store import KernelCache

        self.opts = opts
        self.target = target
        self.cache = KernelCache(Path(opts.cache_dir) / "kernels.sqlite" if opts.cache_dir else None)
        self.proposers = None
        if opts.models and opts.mode == "search":
            from autocomp_compile.agents.llm import LLMProposer
            from autocomp_compile.agents.llm_client import LLMClient

            self.proposers = [LLMProposer(LLMClient(opts.models, api_base=opts.api_base))]

    def _kernel_for(self, workload) -> Decision:
        from autocomp_compile.optimize import optimize
        from autocomp_compile.search.beam import SearchConfig

        kind, name = workload.kind, workload.name
        entry = self.cache.get(self.target, workload)
        source = "cache"
        if entry is None and self.opts.mode == "search":
            t0 = time.perf_counter()
            _log(self.opts, f"autocomp: searching {name} ({self.opts.budget} candidates) ...")
            result = optimize(workload, self.target, SearchConfig(budget=self.opts.budget, seed=self.opts.seed),
                              output_dir=self.opts.output_dir, cache=self.cache, proposers=self.proposers)
            _log(self.opts, f"autocomp: {name} searched in {time.perf_counter() - t0:.0f} s")
            entry = self.cache.get(self.target, workload) if result.best is not None else None
            source = "search"
            if entry is None:
                return Decision(kind, name, 0, False, reason="search found no correct kernel")
        if entry is None:
            return Decision(kind, name, 0, False, reason="not in the kernel cache (run `autocomp-compile warm` "
                            "or use mode='search')")
        speedup = entry.speedup
        if speedup is not None and speedup < self.opts.min_speedup:
            return Decision(kind, name, 0, False, source, speedup, key=entry.key,
                            reason=f"the best kernel is {speedup:.2f}x eager, below min_speedup {self.opts.min_speedup}")
        try:
            REGISTRY.add(entry.key, self.target, workload, entry.candidate())
        except KernelUnavailable as exc:
            return Decision(kind, name, 0, False, source, speedup, key=entry.key, reason=str(exc))
        return Decision(kind, name, 0, True, source, speedup, key=entry.key)

    def rewrite(self, gm: fx.GraphModule) -> GraphReport:
        t0 = time.perf_counter()
        report = GraphReport(self.target.name, self.opts.mode)
        decisions: dict[str, Decision] = {}
        plan: list[tuple[Match, Decision]] = []
        for match in find_subgraphs(gm):
            if match.workload is None:
                d = decisions.setdefault(f"{match.kind}:{match.reason}",
                                         Decision(match.kind, match.kind, 0, False, reason=match.reason))
            elif match.kind not in self.opts.kinds:
                d = decisions.setdefault(match.workload.signature(), Decision(
                    match.kind, match.workload.name, 0, False, reason=f"kind {match.kind!r} not in options['kinds']"))
            else:
                sig = match.workload.signature()
                if sig not in decisions:
                    with unset_fake_temporarily():  # real tensors for searching and checking kernels
                        decisions[sig] = self._kernel_for(match.workload)
                d = decisions[sig]
            d.count += 1
            plan.append((match, d))
        for match, d in plan:
            if d.replaced and d.key:
                match.replace(gm.graph, d.key)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        report.decisions = list(decisions.values())
        report.seconds = time.perf_counter() - t0
        return report

    def close(self) -> None:
        self.cache.close()


def _log(opts: BackendOptions, text: str) -> None:
    if opts.verbose:
        print(text, file=sys.stderr, flush=True)


def autocomp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                     mode: str | None = None) -> Callable:
    """torch.compile backend: recognised subgraphs run autocomp kernels, the rest runs through inductor."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    if mode not in (None, "default"):
        raise BackendOptionsError(f"autocomp: torch.compile(mode={mode!r}) is inductor's; "
                                  "pass options={'mode': 'cache-only' | 'search' | 'off'} instead")
    opts = BackendOptions.parse(options)
    if opts.mode == "off":
        return compile_fx(gm, example_inputs)
    try:
        target = _pick_target(opts, example_inputs)
    except TargetError as exc:
        raise BackendOptionsError(f"autocomp: {exc}") from exc

    def inner_compile(aten_gm: fx.GraphModule, aten_inputs: Sequence[Any], **kwargs: Any) -> Any:
        rewriter = Rewriter(opts, target)
        try:
            report = rewriter.rewrite(aten_gm)
        finally:
            rewriter.close()
        REPORTS.append(report)
        _log(opts, report.summary())
        return compile_fx_inner(aten_gm, aten_inputs, **kwargs)

    # AOTAutogradCache would hand back a compiled graph without calling inner_compile (no rewrite, no report).
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner_compile)


def register() -> None:
    """Register the backend under the name "autocomp" (idempotent).

    When dynamo has already discovered the `torch_dynamo_backends` entry point, it registers the
    backend itself on first use (and would refuse a second registration), so nothing is done here.
    """
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "autocomp" not in _COMPILER_FNS and _BACKENDS.get("autocomp") is None:
        register_backend(compiler_fn=autocomp_backend, name="autocomp")


register()
