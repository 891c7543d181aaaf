"""The check a cached kernel passes in the user's process before it enters a model."""
from __future__ import annotations

import pytest

from autocomp_compile.passes.kernels import KernelUnavailable, check_loaded
from autocomp_compile.targets.cpu.runtime import CpuKernel
from tests.helpers import build_ok, decode_attention_code


def _decode_kernel(tmp_path, edit=None):
    w, code, isa = decode_attention_code(edit)
    return w, CpuKernel(build_ok(code, isa, tmp_path).so_path, len(w.tensors))


def test_a_decode_kernel_is_checked_at_another_kv_length_too(tmp_path):
    """The model calls decode attention at every KV length: a kernel (cached before the search checked several
    lengths) that bakes in its tuned length is refused at the maximum length, which is named."""
    w, honest = _decode_kernel(tmp_path)
    check_loaded(honest, w)
    _, baked = _decode_kernel(tmp_path, ("const int64_t L = dims[0];", f"const int64_t L = {w.runtime_dims['kv_len']};"))
    with pytest.raises(KernelUnavailable, match=r"wrong result in this process \(kv_len=64\)"):
        check_loaded(baked, w)


def test_a_kernel_that_raises_in_the_check_is_unavailable_not_a_crash(tmp_path):
    w, _ = _decode_kernel(tmp_path)

    def broken(tensors, dims):
        raise RuntimeError("launch failed: too many resources requested")

    with pytest.raises(KernelUnavailable, match="too many resources"):
        check_loaded(broken, w)


@pytest.mark.parametrize("broken", [False, True])
def test_the_run_time_loader_checks_an_imported_kernel_in_a_worker_before_running_it(tmp_path, broken):
    """A module or graph built elsewhere loads its kernels by key: an imported kernel is evaluated in the isolated
    worker first (it ran in this process before, where a crashing one took the process down)."""
    from autocomp_compile.passes.kernels import REGISTRY
    from tests.helpers import exported_cpu_kernel

    edit = ("for (", "*(volatile int *)t[-100000] = 0; for (") if broken else None
    w, dst = exported_cpu_kernel(tmp_path, code_edit=edit)
    key = dst.entries()[0].key
    cache_dir = str(tmp_path / "dst")
    REGISTRY.clear()
    try:
        kernel = REGISTRY.get(key, cache_dir)
        if broken:
            assert kernel is None and "did not pass its check" in REGISTRY.failure(key, cache_dir)
            assert dst.entries() == []
        else:
            assert kernel is not None and not dst.entries()[0].unchecked
    finally:
        REGISTRY.clear()


def test_the_registry_runs_the_kernel_added_last_under_a_key(tmp_path, monkeypatch):
    """A cache key names a workload, not a kernel: a faster kernel cached later under the same key (a search, another
    cache directory) replaces the one this process loaded first, instead of being silently ignored."""
    import dataclasses

    from autocomp_compile.passes.kernels import REGISTRY
    from autocomp_compile.targets.base import get_target
    from autocomp_compile.targets.cpu import codegen
    from autocomp_compile.targets.cpu.isa import supported_isas
    from tests.helpers import small

    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path))  # the target's build folder
    target, w = get_target("cpu"), small("gemm", "fp32")
    naive = target.lower(w)
    tuned_code = codegen.generate(w, codegen.legalize(w, {"isa": supported_isas()[-1], "rows": 4}, supported_isas()))
    tuned = dataclasses.replace(naive, code=tuned_code)
    REGISTRY.clear()
    try:
        first = REGISTRY.add("k", target, w, naive)
        assert REGISTRY.add("k", target, w, naive) is first  # the same kernel again: not built or loaded twice
        second = REGISTRY.add("k", target, w, tuned)
        assert second is not first and second.code_hash == tuned.code_hash
        assert REGISTRY.get("k") is second
    finally:
        REGISTRY.clear()
