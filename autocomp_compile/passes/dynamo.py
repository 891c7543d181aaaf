"""The `autocomp` torch.compile backend.

    torch.compile(model, backend="autocomp", options={"mode": "cache-only"})

Dynamo's graph goes through inductor's own AOT step; on the resulting aten graph, `passes.fx` finds
attention, SwiGLU MLP, LM head, linear and RMSNorm subgraphs, each one is looked up in the kernel
cache (or searched for, in `search` mode), and the ones with a correct kernel that beat PyTorch are
replaced by `torch.ops.autocomp.*` calls. Inductor compiles everything else as usual.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from autocomp_compile.passes import ALL_KINDS, DEFAULT_KINDS
from autocomp_compile.passes.fx import Match, find_subgraphs
from autocomp_compile.passes.selection import (MODES, Decision, GraphReport, KernelSelector, decide_region,
                                                decide_releasing, log)
from autocomp_compile.targets.base import Target, TargetError, get_target, require_available

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
    cudagraphs: replay the compiled graph as CUDA graphs (inductor's cudagraph trees), as inductor's
        `mode="reduce-overhead"` does; `torch.compile(..., backend="autocomp", mode="reduce-overhead")`
        sets it. On the CPU inductor ignores it.
    models, api_base: LLM models (`provider::model`) that propose kernels in `search` mode, and an
        OpenAI-compatible server for them; without models the offline menu-driven proposer searches.
    deterministic: use (and search for) only bit-reproducible kernels: on CUDA, none that sums with float
        atomics. Default: whether `torch.use_deterministic_algorithms(True)` is in force when a graph is
        compiled. Kernels with float atomics also step aside, call by call, whenever that mode is on.
    timing_ms: wall time (ms) for timing each candidate against eager in `search` mode, and an imported
        kernel on its first use (the CLI's `--timing-ms`); default: the evaluator's 1000 ms.
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
    cudagraphs: bool = False
    deterministic: bool | None = None
    timing_ms: float | None = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise BackendOptionsError(f"unknown autocomp option(s) {unknown}; valid: {sorted(names)}")
        for name in ("kinds", "models"):
            value = options.get(name)
            if isinstance(value, str):
                options[name] = (value,)
            elif isinstance(value, (list, tuple, set, frozenset)):
                options[name] = tuple(value)
            elif name in options:
                raise BackendOptionsError(f"autocomp option {name} must be a name or a list of names, got {value!r}")
        for name in ("cache_dir", "output_dir"):
            if isinstance(options.get(name), os.PathLike):
                options[name] = os.fspath(options[name])
        for name, value in options.items():
            _check_type(name, value)
        for name, kind in (("budget", int), ("seed", int), ("min_speedup", float), ("timing_ms", float)):
            if options.get(name) is not None:  # NumPy scalars, say
                options[name] = kind(options[name])
        opts = cls(**options)
        if opts.mode not in MODES:
            raise BackendOptionsError(f"autocomp option mode={opts.mode!r}; choose one of {list(MODES)}")
        bad = sorted(set(opts.kinds) - set(ALL_KINDS))
        if bad:
            raise BackendOptionsError(f"autocomp option kinds: unknown {bad}; choose from {list(ALL_KINDS)}")
        if opts.budget < 1:
            raise BackendOptionsError(f"autocomp option budget must be >= 1, got {opts.budget}")
        if not (math.isfinite(opts.min_speedup) and opts.min_speedup >= 0):
            raise BackendOptionsError(f"autocomp option min_speedup must be a finite number >= 0, got {opts.min_speedup}")
        if opts.timing_ms is not None and not (math.isfinite(opts.timing_ms) and opts.timing_ms > 0):
            raise BackendOptionsError(f"autocomp option timing_ms must be a finite number > 0, got {opts.timing_ms}")
        if any(not m.strip() for m in opts.models):
            raise BackendOptionsError(f"autocomp option models: an empty model name in {list(opts.models)}")
        return opts


# What each option may hold (bool is an Integral to Python, so it is refused where a number is meant).
_OPTION_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "target": ("a target name or None", lambda v: v is None or isinstance(v, str)),
    "mode": ("a string", lambda v: isinstance(v, str)),
    "budget": ("an int", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    "kinds": ("kind names", lambda v: all(isinstance(k, str) for k in v)),
    "min_speedup": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    "cache_dir": ("a path or None", lambda v: v is None or isinstance(v, str)),
    "output_dir": ("a path", lambda v: isinstance(v, str)),
    "seed": ("an int", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    "verbose": ("True or False", lambda v: isinstance(v, bool)),
    "models": ("model names (provider::model)", lambda v: all(isinstance(m, str) for m in v)),
    "api_base": ("a URL or None", lambda v: v is None or isinstance(v, str)),
    "cudagraphs": ("True or False", lambda v: isinstance(v, bool)),
    "deterministic": ("True, False or None", lambda v: v is None or isinstance(v, bool)),
    "timing_ms": ("a number or None", lambda v: v is None or isinstance(v, numbers.Real) and not isinstance(v, bool)),
}


def _check_type(name: str, value: Any) -> None:
    expected, ok = _OPTION_TYPES[name]
    if not ok(value):
        raise BackendOptionsError(f"autocomp option {name} must be {expected}, got {value!r}")


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
        self.opts = opts
        self.target = target
        self.selector = KernelSelector(target, opts.mode, opts.budget, opts.min_speedup, opts.cache_dir,
                                       opts.output_dir, opts.seed, opts.models, opts.api_base, opts.verbose,
                                       opts.deterministic, opts.timing_ms)

    def rewrite(self, gm: fx.GraphModule) -> GraphReport:
        t0 = time.perf_counter()
        report = GraphReport(self.target.name, self.opts.mode, deterministic=self.selector.deterministic)
        decisions: dict[str, Decision] = {}

        def decide(m: Match) -> Decision:
            with unset_fake_temporarily():  # real tensors for searching and checking kernels
                return decide_region(self.selector, decisions, m.kind, m.workload, m.reason, self.opts.kinds,
                                     "options['kinds']")

        plan = decide_releasing(lambda released: find_subgraphs(gm, self.opts.kinds, released), decide,
                                lambda m: m.anchor)
        for _, d in plan:
            d.count += 1
        replaced: dict[fx.Node, fx.Node] = {}
        for match, d in plan:
            if d.replaced and d.key:
                match.replace(gm.graph, d.key, replaced)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        report.decisions = list(decisions.values())
        report.seconds = time.perf_counter() - t0
        return report

    def close(self) -> None:
        self.selector.close()


def autocomp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                     mode: str | None = None) -> Callable:
    """torch.compile backend: recognised subgraphs run autocomp kernels, the rest runs through inductor."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    if mode not in (None, "default", "reduce-overhead"):
        raise BackendOptionsError(f"autocomp: torch.compile(mode={mode!r}) is not supported (only 'default' and "
                                  "'reduce-overhead'); pass options={'mode': 'cache-only' | 'search' | 'off'} for ours")
    opts = BackendOptions.parse(options)
    if mode == "reduce-overhead":
        opts = dataclasses.replace(opts, cudagraphs=True)
    patches = {"triton.cudagraphs": True} if opts.cudagraphs else None
    if opts.mode == "off":
        return compile_fx(gm, example_inputs, config_patches=patches)
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
        log(opts.verbose, report.summary())
        if target.name == "cuda" and not opts.cudagraphs and report.replaced:
            log(opts.verbose, "autocomp: on a GPU, options={..., 'cudagraphs': True} (or mode='reduce-overhead' "
                              "without options) replays each step as a CUDA graph; without it small-batch decoding "
                              "is bound by launch overhead")
        return compile_fx_inner(aten_gm, aten_inputs, **kwargs)

    # AOTAutogradCache would hand back a compiled graph without calling inner_compile (no rewrite, no report).
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)


def register() -> None:
    """Register the backend under the name "autocomp" (idempotent).

    When dynamo has already discovered the `torch_dynamo_backends` entry point, it registers the
    backend itself on first use (and would refuse a second registration), so nothing is done here.
    """
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "autocomp" not in _COMPILER_FNS and _BACKENDS.get("autocomp") is None:
        register_backend(compiler_fn=autocomp_backend, name="autocomp")


register()
