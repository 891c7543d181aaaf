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
