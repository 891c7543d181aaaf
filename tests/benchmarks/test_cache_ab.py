"""benchmarks/cache_ab.py: each variant runs its own cache's kernels, the table and JSON it writes."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from autocomp_compile import EvalSettings, SearchConfig, optimize
from autocomp_compile.kernels_cache import KernelCache
from autocomp_compile.models.workloads import model_workloads

_spec = importlib.util.spec_from_file_location("cache_ab", Path(__file__).parents[2] / "benchmarks" / "cache_ab.py")
cache_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cache_ab)


def _cache_mlp(directory: Path, budget: int, runs: Path) -> str:
    """The tiny model's MLP searched with `budget` candidates into the cache in `directory`; its kernel's code hash."""
    (mlp,) = model_workloads("tiny-llama", "fp32", kinds=["mlp"])
    with KernelCache.in_directory(directory) as cache:
        optimize(mlp, "cpu", SearchConfig(budget=budget, seed=0), EvalSettings(correctness_sets=1, timing_budget_ms=20),
                 output_dir=runs, cache=cache)
        (entry,) = cache.entries()
        return entry.code_hash


def test_each_variant_runs_the_kernels_of_its_own_cache(tmp_path, monkeypatch):
    """Both caches hold a kernel for the same MLP under the same cache key (same machine, same workload): the naive
    one in B, a searched one in A. Each variant's steps must run its own (a process that kept the first kernel loaded
    under a key ran A's in B's steps too)."""
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "default"))
    searched, naive = _cache_mlp(tmp_path / "a", 4, tmp_path / "runs"), _cache_mlp(tmp_path / "b", 1, tmp_path / "runs")
    assert searched != naive
    args = argparse.Namespace(model="tiny-llama", dtype="fp32", cache_a=str(tmp_path / "a"), cache_b=str(tmp_path / "b"),
                              rounds=2, steps=3, pos=None, verbose=False, min_speedup=0.0)  # each kernel, fast or not
    res = cache_ab.run(args)
    assert res["pos"] == 64  # half of tiny-llama's max_seq_len
    assert res["kernels_run"] == {"A": {"mlp": [searched]}, "B": {"mlp": [naive]}}
    assert res["kernel_ms_per_step"]["A"]["mlp"] > 0 and res["kernel_ms_per_step"]["B"]["mlp"] > 0
    assert set(res["step_ms"]) == {"A", "B", "eager"} and len(res["speedup_vs_eager_per_round"]["B"]) == 2
    cache_ab.print_tables(res)
