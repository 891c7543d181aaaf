"""MetaSchedule tuning of a Relax module on TVM 0.27's CPU backend, for comparisons with the autocomp pass.

`relax.pipeline.static_shape_tuning_pipeline` tunes with the default `LocalBuilder`, whose build function
imports `tvm.s_tir.tensor_intrin` (every tensor intrinsic, parsed from TVMScript: 74 s on this 2-core
machine) in each worker, and the builder starts a fresh worker pool for every batch of candidates: each
build then exceeds its 30 s timeout and tuning measures nothing. `tune` runs the same pipeline with a
build function that leaves tensor intrinsics out (the CPU float schedules do not use them).
"""
from __future__ import annotations

from typing import Any

import tvm
from tvm import relax


def build_without_tensor_intrinsics(mod: tvm.IRModule, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build, minus the `tvm.s_tir.tensor_intrin` import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def tune(mod: tvm.IRModule, target: Any, work_dir: str, trials: int, trials_per_task: int | None = None,
         trials_per_iter: int = 16, build_timeout_s: float = 60.0) -> tvm.IRModule:
    """`static_shape_tuning_pipeline` (without weight prepacking) with a working builder.

    `trials == 0` applies an existing database in `work_dir` without tuning.
    """
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.CanonicalizeBindings(),
                                        relax.pipeline.zero_pipeline()])(mod)
        if trials > 0:
            builder = ms.builder.LocalBuilder(f_build=build_without_tensor_intrinsics, timeout_sec=build_timeout_s)
            ms.relax_integration.tune_relax(mod, params={}, target=target, work_dir=work_dir,
                                            max_trials_global=trials, max_trials_per_task=trials_per_task,
                                            num_trials_per_iter=trials_per_iter, builder=builder)
        return relax.transform.MetaScheduleApplyDatabase(work_dir)(mod)
