"""`AutocompPartition`: a Relax module pass that offloads attention, SwiGLU MLP, LM-head, linear and RMSNorm
regions to kernels from the autocomp kernel cache.

    seq = tvm.transform.Sequential([AutocompPartition(target="cpu", mode="cache-only"), relax.get_pipeline()])
    mod = seq(mod)  # then relax.build(mod, target) as usual

Put it first, on the module a frontend produced (`relax.frontend.torch.from_exported_program` or
`relax.frontend.onnx.from_onnx`) and before `LegalizeOps`: it matches high-level Relax ops. Each region
found by `passes.relax_patterns` becomes a Workload; the kernel comes from the cache (or a search, by
`mode`) and must pass the reference check in this process; the region is then replaced by
`R.call_dps_packed("autocomp.kernel.<key>", ...)`, a packed function this module registers, which calls
the kernel on the VM's tensors without copies. Everything else stays with TVM. `pass.report` (a
`GraphReport`) says what was replaced and why the rest was not; rejected matches are logged with their
reason. A process that runs a module built elsewhere calls `register_kernels(mod, cache_dir)` first (the
partition's `cache_dir`, when it had one).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from autocomp_compile.passes import ALL_KINDS, DEFAULT_KINDS
from autocomp_compile.passes.dynamo import BackendOptions, BackendOptionsError
from autocomp_compile.passes.kernels import REGISTRY
from autocomp_compile.passes.relax_patterns import PATTERNS, Constant, Region, constant_array, lm_head_weights, shape_of
from autocomp_compile.passes.selection import (MODES, Decision, GraphReport, KernelSelector, decide_region,
                                                decide_releasing, log)
from autocomp_compile.targets.base import TargetError, get_target, require_available

logger = logging.getLogger(__name__)

KERNEL_PREFIX = "autocomp.kernel."
_TVM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class PartitionError(ValueError):
    """Bad options for AutocompPartition."""


# ---------------------------------------------------------------- runtime: packed functions the VM calls


def _kernel_function(key: str, cache_dir: str | None):
    state: dict[str, Any] = {}

    def run(*args: Any) -> None:
        import torch

        kernel = state.get("kernel")
        if kernel is None:
            kernel = REGISTRY.get(key, cache_dir)
            if kernel is None:
                raise RuntimeError(f"autocomp kernel {key} is unavailable in this process: "
                                   f"{REGISTRY.failure(key, cache_dir)}; register_kernels(mod, cache_dir) with "
                                   "the cache the module was partitioned with")
            state["kernel"] = kernel
        tensors = [torch.from_dlpack(a) for a in args if not isinstance(a, int)]
        kernel.run(tensors, [a for a in args if isinstance(a, int)])

    return run


_REGISTERED: dict[str, str | None] = {}  # global function name -> the cache directory it loads from


def register_kernel_function(key: str, cache_dir: str | None = None) -> str:
    """Register `autocomp.kernel.<key>`, loading from the kernel cache in `cache_dir` (default the user's) on
    first call; returns the name. Registering again with another cache directory replaces the function (a
    VirtualMachine made afterwards calls the new one)."""
    name = KERNEL_PREFIX + key
    known = name in _REGISTERED or tvm.get_global_func(name, allow_missing=True) is not None
    if not known or _REGISTERED.get(name) != cache_dir:
        tvm.register_global_func(name, _kernel_function(key, cache_dir), override=known)
        _REGISTERED[name] = cache_dir
    return name


def kernel_keys(mod: tvm.IRModule) -> list[str]:
    """Keys of the autocomp kernels that `mod` calls."""
    keys: list[str] = []

    def visit(e: Any) -> None:
        if isinstance(e, relax.ExternFunc) and e.global_symbol.startswith(KERNEL_PREFIX):
            key = e.global_symbol[len(KERNEL_PREFIX):]
            if key not in keys:
                keys.append(key)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return keys


def register_kernels(mod: tvm.IRModule, cache_dir: str | None = None) -> list[str]:
    """Register the packed functions of every autocomp kernel that `mod` calls; kernels load on first call from
    the kernel cache in `cache_dir` (pass the partition's `cache_dir`; default the user's cache)."""
    return [register_kernel_function(k, cache_dir) for k in kernel_keys(mod)]


# ---------------------------------------------------------------- rewriting


@dataclass
class _Plan:
    region: Region
    key: str


def _as_var(e: relax.Expr, val2var: dict) -> relax.Expr:
    return val2var.get(e, e)


@mutator
class _RegionReplacer(PyExprMutator):
    """Rebinds each planned region's output variable to a kernel call; the region's other bindings become dead."""

    def __init__(self, mod: tvm.IRModule, plans: dict, val2var: dict, cache_dir: str | None):
        super().__init__(mod)
        self.plans = plans
        self.cache_dir = cache_dir
        self.val2var = val2var

    def _arg(self, a: Any, shape: tuple[int, ...]) -> relax.Expr:
        transpose = isinstance(a, tuple) and a[0] == "transpose"
        expr = a[1] if transpose else a
        if isinstance(expr, Constant) and transpose:
            return relax.const(np.ascontiguousarray(constant_array(expr).T))
        expr = self.visit_expr(_as_var(expr, self.val2var))
        if transpose:
            expr = self.builder_.emit(relax.op.permute_dims(expr, [1, 0]))
        if shape_of(expr) != tuple(shape):
            expr = self.builder_.emit(relax.op.reshape(expr, shape))
        return expr

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        plan = self.plans.get(binding.var)
        if plan is None:
            return super().visit_var_binding_(binding)
        region, w = plan.region, plan.region.workload
        args = [self._arg(a, spec.shape) for a, spec in zip(region.args, w.inputs)]
        args += [relax.prim_value(tvm.tirx.IntImm("int64", d)) for d in region.runtime_dims]
        out_ty = relax.TensorType(list(region.kernel_shape), _TVM_DTYPES[w.dtype])
        call = relax.call_dps_packed(register_kernel_function(plan.key, self.cache_dir), args, out_ty)
        value: relax.Expr = call
        own_shape = shape_of(binding.var)
        if own_shape != tuple(region.kernel_shape):
            value = relax.op.reshape(self.builder_.emit(call), own_shape)
        # An output of a dataflow block leaves it through emit_output; a plain binding block has no outputs.
        dataflow_output = self.builder_.current_block_is_dataflow() and not isinstance(binding.var, relax.DataflowVar)
        emit = self.builder_.emit_output if dataflow_output else self.builder_.emit
        self.set_var_remap(binding.var, emit(value, name_hint=binding.var.name))


def find_regions(func: relax.Function, kinds: Sequence[str] = ALL_KINDS, released: frozenset = frozenset()
                 ) -> list[Region]:
    """Every region of `func` that a pattern matches, in `PATTERNS` priority, without overlaps.

    A region of a kind outside `kinds`, or whose output is in `released` (a region left to TVM), is still
    listed, but claims none of its operations: its projections can then be linear regions of their own.
    """
    var2val = relax.analysis.get_var2val(func)
    val2var = {val: var for var, val in var2val.items()}
    bindings = [b for block in func.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)]
    head_weights = lm_head_weights(func, var2val)
    claimed: set = set()
    regions: list[Region] = []
    for name, make_pattern, check in PATTERNS:
        pattern, annotations = make_pattern()
        for b in reversed(bindings):  # outermost match first (a region with its casts beats the bare core)
            if not isinstance(b.value, relax.Call):
                continue
            matched = pattern.extract_matched_expr(b.value, var2val)
            if matched is None:
                continue
            ann = {k: matched[p] for k, p in annotations.items() if p in matched}
            region = check(ann, func, head_weights) if name == "autocomp.linear" else check(ann, func)
            if region is None:
                continue
            arg_exprs = {(a[1] if isinstance(a, tuple) else a) for a in region.args}
            inner = {val2var[e] for e in matched.values() if e in val2var and e not in arg_exprs}
            if inner & claimed:
                continue  # part of a region matched by an earlier pattern
            region.output = val2var.get(b.value, b.var)
            if region.workload is not None and region.kind in kinds and region.output not in released:
                claimed |= inner
            regions.append(region)
    order = {b.var: i for i, b in enumerate(bindings)}
    return sorted(regions, key=lambda r: order.get(r.output, 0))


@tvm.transform.module_pass(opt_level=0, name="AutocompPartition")
class AutocompPartition:
    """Offload attention, SwiGLU MLP, LM-head, linear and RMSNorm regions of every Relax function to autocomp kernels.

    Please put the pass before LegalizeOps (first in the pipeline, on the frontend's module).

    Parameters
    ----------
    target : str
        Kernel target: "cpu" (the host; kernels run on the VM's CPU tensors).
    mode : str
        "cache-only": use cached kernels, leave cache misses to TVM; "search": also search for the
        workloads the cache lacks (`budget` candidates each) and cache the winners; "off": no change.
    kinds : sequence of str
        Region kinds that may be offloaded (default: attention, mlp, lm_head, gemm).
    budget, min_speedup, cache_dir, output_dir, seed, models, api_base, verbose, timing_ms :
        As for the torch.compile backend (`BackendOptions`).
    """

    def __init__(self, target: str = "cpu", mode: str = "cache-only", kinds: Sequence[str] = DEFAULT_KINDS,
                 budget: int = 16, min_speedup: float = 1.0, cache_dir: str | None = None,
                 output_dir: str = "output", seed: int = 0, models: Sequence[str] = (),
                 api_base: str | None = None, verbose: bool = True, timing_ms: float | None = None):
        if mode not in MODES:
            raise PartitionError(f"AutocompPartition: mode={mode!r}; choose one of {list(MODES)}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = sorted(set(kinds) - set(ALL_KINDS))
        if bad:
            raise PartitionError(f"AutocompPartition: unknown kinds {bad}; choose from {list(ALL_KINDS)}")
        if target != "cpu":
            raise PartitionError(f"AutocompPartition: target {target!r} is not supported in TVM pipelines yet; use 'cpu'")
        try:  # the options it shares with the torch.compile backend, checked as the backend checks them
            shared = BackendOptions.parse(dict(budget=budget, min_speedup=min_speedup, cache_dir=cache_dir,
                                               output_dir=output_dir, seed=seed, models=models, api_base=api_base,
                                               verbose=verbose, timing_ms=timing_ms))
        except BackendOptionsError as exc:
            raise PartitionError(f"AutocompPartition: {exc}") from exc
        try:
            require_available(get_target(target))
        except TargetError as exc:
            raise PartitionError(f"AutocompPartition: {exc}") from exc
        self.target, self.mode, self.kinds = target, mode, kinds
        self.selector_args = dict(mode=mode, budget=shared.budget, min_speedup=shared.min_speedup,
                                  cache_dir=shared.cache_dir, output_dir=shared.output_dir, seed=shared.seed,
                                  models=shared.models, api_base=api_base, verbose=verbose,
                                  timing_ms=shared.timing_ms)
        self.verbose = verbose
        self.report: GraphReport | None = None

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        t0 = time.perf_counter()
        report = GraphReport(self.target, self.mode, pipeline="AutocompPartition")
        if self.mode == "off":
            self.report = report
            return mod
        selector = KernelSelector(get_target(self.target), **self.selector_args)
        decisions: dict[str, Decision] = {}
        mod = mod.clone()  # the caller's module stays as it was
        try:
            for gvar, func in list(mod.functions_items()):
                if not isinstance(func, relax.Function):
                    continue
                plans = self._plan(func, selector, decisions)
                if plans:
                    var2val = relax.analysis.get_var2val(func)
                    replacer = _RegionReplacer(mod, plans, {v: k for k, v in var2val.items()},
                                               self.selector_args["cache_dir"])
                    mod[gvar] = replacer.visit_expr(func)
        finally:
            selector.close()
        mod = relax.transform.DeadCodeElimination()(mod)
        report.decisions = list(decisions.values())
        report.seconds = time.perf_counter() - t0
        self.report = report
        log(self.verbose, report.summary())
        return mod

    def _plan(self, func: relax.Function, selector: KernelSelector, decisions: dict[str, Decision]) -> dict:
        outcome = decide_releasing(
            lambda released: find_regions(func, self.kinds, released),
            lambda r: decide_region(selector, decisions, r.kind, r.workload, r.reason, self.kinds),
            lambda r: r.output)
        plans = {}
        for region, d in outcome:
            d.count += 1
            if d.replaced and d.key:
                plans[region.output] = _Plan(region, d.key)
            elif region.workload is not None:
                logger.info("AutocompPartition: %s left to TVM: %s", region.workload.name, d.reason)
            else:
                logger.info("AutocompPartition: %s left to TVM: %s", region.kind, region.reason)
        return plans


__all__ = ["AutocompPartition", "PartitionError", "find_regions", "register_kernels", "kernel_keys"]
