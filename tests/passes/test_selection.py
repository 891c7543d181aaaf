"""KernelSelector: which cached kernel may replace a subgraph, in deterministic mode too."""
from __future__ import annotations

import dataclasses

import pytest

from autocomp_compile import EvalResult, get_target, make_workload
from autocomp_compile.kernels_cache.store import KernelCache
from autocomp_compile.passes.kernels import REGISTRY
from autocomp_compile.passes.selection import KernelSelector

W = make_workload("gemm", "fp32", m=1, n=16, k=32)


def _cache_llm_written(cache_dir, extra=None, knobs=None, latency_ms=1.0):
    """The CPU target's naive kernel, cached as an LLM-written kernel (no knobs) or as a schedule (knobs)."""
    cpu = get_target("cpu")
    cand = dataclasses.replace(cpu.lower(W), knobs=knobs, origin="llm:test", models=["test::model"])
    cand.result = EvalResult(correct=True, stage="ok", latency_ms=latency_ms, baseline_ms=2 * latency_ms,
                             extra=extra or {})
    with KernelCache(cache_dir / "kernels.sqlite") as cache:
        assert cache.put(cpu, W, cand)


@pytest.mark.parametrize("how,deterministic,replaced", [
    ("llm", False, True),
    ("llm", True, False),  # never checked for bit-reproducibility
    ("llm-checked", True, True),  # passed the evaluator's repeat check
    ("schedule", True, True),  # a generated CPU schedule fixes its reduction order
])
def test_deterministic_mode_takes_only_kernels_known_to_be_reproducible(tmp_path, how, deterministic, replaced):
    knobs = get_target("cpu").lower(W).knobs if how == "schedule" else None
    _cache_llm_written(tmp_path, {"repeatable": True} if how == "llm-checked" else None, knobs)
    sel = KernelSelector(get_target("cpu"), cache_dir=str(tmp_path), verbose=False, deterministic=deterministic)
    try:
        d = sel.decide(W)
    finally:
        sel.close()
        REGISTRY.clear()
    assert d.replaced is replaced, d.reason
    if not replaced:
        assert "never checked for bit-reproducibility" in d.reason and "a search with --deterministic" in d.reason


def test_deterministic_search_replaces_an_unchecked_kernel_however_fast(tmp_path):
    """In search mode an unchecked cached kernel is a miss for deterministic mode: the search's checked winner
    takes its place in the cache even though the unchecked one claims to be faster."""
    _cache_llm_written(tmp_path, latency_ms=1e-9)
    sel = KernelSelector(get_target("cpu"), mode="search", budget=2, min_speedup=0.0, cache_dir=str(tmp_path),
                         output_dir=str(tmp_path / "runs"), verbose=False, deterministic=True)
    try:
        d = sel.decide(W)
    finally:
        sel.close()
        REGISTRY.clear()
    assert d.replaced and d.source == "search", d.reason
    with KernelCache(tmp_path / "kernels.sqlite") as cache:
        assert cache.get(get_target("cpu"), W).reproducible


@pytest.mark.parametrize("wrong", [False, True])
def test_an_imported_kernel_is_checked_here_before_it_replaces_a_subgraph(tmp_path, wrong):
    """Its latency (and min_speedup's verdict) is what was measured here, not the file's; a wrong one is removed."""
    _cache_llm_written(tmp_path / "a", latency_ms=1e-6)
    with KernelCache(tmp_path / "a" / "kernels.sqlite") as src:
        src.export(tmp_path / "e.json")
    if wrong:
        import json

        from autocomp_compile.search.candidate import normalized_code_hash

        data = json.loads((tmp_path / "e.json").read_text())
        e = data["entries"][0]
        e["code"] = e["code"].replace("void autocomp_kernel(", "void not_the_entry_point(")
        e["code_hash"] = normalized_code_hash(e["code"])
        (tmp_path / "e.json").write_text(json.dumps(data))
    (tmp_path / "b").mkdir()
    with KernelCache(tmp_path / "b" / "kernels.sqlite") as dst:
        dst.import_(tmp_path / "e.json", {"cpu": get_target("cpu").fingerprint()["codegen"]})
    sel = KernelSelector(get_target("cpu"), cache_dir=str(tmp_path / "b"), verbose=False)
    try:
        d = sel.decide(W)
    finally:
        sel.close()
        REGISTRY.clear()
    with KernelCache(tmp_path / "b" / "kernels.sqlite") as dst:
        left = dst.entries()
    if wrong:
        assert not d.replaced and left == []
    else:
        assert len(left) == 1 and not left[0].unchecked and left[0].latency_ms > 1e-6
        assert d.speedup == pytest.approx(left[0].speedup)


def _cache_naive(cache_dir, w):
    cpu = get_target("cpu")
    cand = cpu.lower(w)
    cand.result = EvalResult(correct=True, stage="ok", latency_ms=1.0, baseline_ms=2.0)
    with KernelCache(cache_dir / "kernels.sqlite") as cache:
        assert cache.put(cpu, w, cand)


def test_a_miss_names_the_row_counts_the_cache_holds_for_that_shape(tmp_path):
    """A prompt length nobody warmed: the miss says which lengths are cached, and how to pad prompts to them."""
    for m in (8, 4):
        _cache_naive(tmp_path, make_workload("gemm", "fp32", m=m, n=16, k=32))
    _cache_naive(tmp_path, make_workload("gemm", "fp32", m=16, n=24, k=32))  # another shape: not named
    _cache_naive(tmp_path, make_workload("gemm", "bf16", m=16, n=16, k=32))  # another dtype: not named
    sel = KernelSelector(get_target("cpu"), cache_dir=str(tmp_path), verbose=False)
    try:
        miss = sel.decide(make_workload("gemm", "fp32", m=5, n=16, k=32))
        other = sel.decide(make_workload("gemm", "fp32", m=5, n=8, k=32))
    finally:
        sel.close()
        REGISTRY.clear()
    assert not miss.replaced
    assert miss.reason.endswith("; cached for m = 4, 8 (generate(..., prefill_buckets=...) pads prompts to warmed "
                                "lengths)"), miss.reason
    assert other.reason == "not in the kernel cache (run `autocomp-compile warm` or use mode='search')"
